"""Our relation losses give torchdistill's values on the same tensors.

torchdistill is a test-only reference (``pip install --no-deps torchdistill``: its loss modules
import without torchvision, and ``--no-deps`` keeps pip from touching torch).  Intentional
difference, tested explicitly below: torchdistill's SPKDLoss calls ``normalize(G, 1)``, which
sets p=1 (an L1 row normalisation) where the paper and the authors' code use the L2 norm; we
follow the paper.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import relations as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:
    from torchdistill.losses import mid_level as TD
except Exception as err:  # noqa: BLE001 -- any import failure means: no reference to compare with
    TD = None
    _why = f"torchdistill not importable ({type(err).__name__}: {err}); pip install --no-deps torchdistill"
else:
    _why = ""

pytestmark = [pytestmark, pytest.mark.skipif(TD is None, reason=_why)]

D = torch.float64


def _randn(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _io(path, value, key="output"):
    return {path: {key: value}}


# Feature shapes: CNN map vs MLP vector (cross family), and plain vectors of different widths.
SHAPES = [((8, 3, 2, 2), (8, 5)), ((16, 7), (16, 4)), ((6, 4, 3, 3), (6, 2, 5, 5))]


@pytest.mark.parametrize("s_shape,t_shape", SHAPES)
def test_rkd_matches_torchdistill(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=1), _randn(*t_shape, seed=2)
    ours_d, ours_a = R.rkd_distance(s, t), R.rkd_angle(s, t)
    for dist, angle in ((1.0, 0.0), (0.0, 1.0), (25.0, 50.0)):
        ref = TD.RKDLoss("s", "t", dist, angle, "mean")(_io("s", s), _io("t", t))
        torch.testing.assert_close(dist * ours_d + angle * ours_a, torch.as_tensor(ref, dtype=D), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("s_shape,t_shape", SHAPES)
def test_pkt_matches_torchdistill(s_shape, t_shape):
    # torchdistill's PKTLoss takes (N, D) vectors (the penultimate layer): flatten maps first
    s, t = _randn(*s_shape, seed=3).flatten(1), _randn(*t_shape, seed=4).flatten(1)
    ref = TD.PKTLoss("s", "output", "t", "output")(_io("s", s.clone()), _io("t", t.clone()))
    torch.testing.assert_close(R.pkt(s, t), ref, rtol=1e-10, atol=1e-14)


class _SPKDLossL2(TD.SPKDLoss if TD is not None else object):
    """torchdistill's SPKDLoss with the paper's L2 row normalisation (its only difference)."""

    def matmul_and_normalize(self, z):
        z = torch.flatten(z, 1)
        return F.normalize(torch.matmul(z, torch.t(z)), p=2, dim=1)


@pytest.mark.parametrize("s_shape,t_shape", SHAPES)
def test_sp_matches_torchdistill_up_to_its_l1_normalisation(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=5), _randn(*t_shape, seed=6)
    ref_l2 = _SPKDLossL2("s", "t", "batchmean")(_io("s", s), _io("t", t))
    torch.testing.assert_close(R.similarity_preserving(s, t), ref_l2, rtol=1e-10, atol=1e-14)
    # The unmodified class normalises rows by their L1 norm (normalize(G, 1) sets p=1):
    ref = TD.SPKDLoss("s", "t", "batchmean")(_io("s", s), _io("t", t))
    g = lambda x: F.normalize(x.flatten(1) @ x.flatten(1).T, p=1, dim=1)  # noqa: E731
    b = s.shape[0]
    torch.testing.assert_close(ref, (g(t) - g(s)).pow(2).sum() / b**2, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(ref, R.similarity_preserving(s, t))


def test_crd_matches_torchdistill_memory_bank_loss():
    """Index-based CRD (torchdistill's port of the authors' ContrastMemory + ContrastLoss) on
    the same memory, positives and drawn negatives, including Z set from the first batch."""
    torch.manual_seed(0)
    n, d, k, b, tau = 40, 6, 7, 5, 0.07
    ref = TD.CRDLoss("s_norm", "s_empty", "t_norm", input_size=d, output_size=n, num_negative_samples=k,
                     num_samples=n, temperature=tau, momentum=0.5)
    mem_s, mem_t = ref.memory_v1.clone(), ref.memory_v2.clone()  # v1: student side, v2: teacher side
    es = F.normalize(_randn(b, d, seed=7, dtype=torch.float32), dim=1)
    et = F.normalize(_randn(b, d, seed=8, dtype=torch.float32), dim=1)
    pos = torch.tensor([3, 17, 0, 25, 39])
    contrast = torch.randint(n, (b, k + 1), generator=torch.Generator().manual_seed(9))
    contrast[:, 0] = pos
    expected = ref({"s_norm": {"output": es}, "s_empty": {"input": {"pos_idx": pos, "contrast_idx": contrast}}},
                   {"t_norm": {"output": et}})

    # student anchor against the teacher's memory, teacher anchor against the student's memory
    scores_s = R.crd_scores(es, mem_t[pos], mem_t[contrast[:, 1:]], temperature=tau)
    scores_t = R.crd_scores(et, mem_s[pos], mem_s[contrast[:, 1:]], temperature=tau)
    z_s, z_t = R.crd_normaliser(scores_s, n), R.crd_normaliser(scores_t, n)
    ours = R.crd_nce_loss(scores_s, z=z_s, n_data=n) + R.crd_nce_loss(scores_t, z=z_t, n_data=n)
    torch.testing.assert_close(ours.reshape(()), expected.reshape(()), rtol=1e-5, atol=1e-6)
    assert ref.params[2].item() == pytest.approx(z_s.item(), rel=1e-5)  # the same Z
    assert ref.params[3].item() == pytest.approx(z_t.item(), rel=1e-5)
