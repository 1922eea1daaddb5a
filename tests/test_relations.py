"""Relation-based losses (RKD, similarity-preserving, PKT, CRD's NCE) against their definitions:
hand values on tiny tensors, the invariances the papers state, and float64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import relations as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _orthogonal(n, seed=0):
    q, _ = torch.linalg.qr(_randn(n, n, seed=seed))
    return q


# --------------------------------------------------------------------------- RKD


def test_pairwise_distances_hand_values():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]], dtype=D)
    expected = torch.tensor([[0, 5, 4], [5, 0, 3], [4, 3, 0]], dtype=D)
    torch.testing.assert_close(R.pairwise_distances(e), expected)


def test_rkd_distance_hand_value():
    # student distances 5, 4, 3 (mean 4) -> 5/4, 1, 3/4; teacher on a line: 1, 2, 1 (mean 4/3)
    # -> 3/4, 3/2, 3/4.  Differences 1/2, -1/2, 0: Huber 1/8 each for two pairs, both orders
    # counted, mean over the 3 x 3 entries: (4 * 1/8) / 9.
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]], dtype=D)
    t = torch.tensor([[0.0], [1.0], [2.0]], dtype=D)
    assert R.rkd_distance(s, t).item() == pytest.approx(0.5 / 9, rel=1e-12)


def test_rkd_distance_invariances():
    s, t = _randn(6, 5, seed=1), _randn(6, 3, seed=2)
    ref = R.rkd_distance(s, t)
    # normalisation by the mean distance: scaling either side changes nothing; so do rotations
    # and translations (distances are unchanged)
    assert R.rkd_distance(3.7 * s, 0.2 * t).item() == pytest.approx(ref.item(), rel=1e-10)
    assert R.rkd_distance(s @ _orthogonal(5) + 1.5, t).item() == pytest.approx(ref.item(), rel=1e-10)
    assert R.rkd_distance(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-12)
    # two samples: the one distance always normalises to 1
    assert R.rkd_distance(_randn(2, 4, seed=3), _randn(2, 9, seed=4)).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_angle_hand_value():
    # student: right isosceles triangle (cos 0 at the right angle, cos(45 deg) at the others);
    # teacher: three collinear points (cos 1, -1, 1).  Per vertex two ordered (j != k) entries:
    # diffs 1 (Huber 1/2), 1 + sqrt2/2 (> 1: linear, sqrt2/2 + 1/2), sqrt2/2 - 1 (quadratic);
    # their sum is exactly 3.5, and the mean is over the 27 index triplets.
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)
    t = torch.tensor([[0.0], [1.0], [2.0]], dtype=D)
    assert R.rkd_angle(s, t).item() == pytest.approx(3.5 / 27, rel=1e-12)
    a = R.angle_potentials(s)
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-12)
    assert a[1, 0, 2].item() == pytest.approx(math.sqrt(0.5), rel=1e-12)
    assert a[1, 1, 2].item() == 0.0  # j == i: the zero vector


def test_rkd_angle_invariances():
    s, t = _randn(5, 4, seed=5), _randn(5, 6, seed=6)
    ref = R.rkd_angle(s, t).item()
    assert R.rkd_angle(0.3 * s @ _orthogonal(4, seed=1) - 2.0, 7.0 * t).item() == pytest.approx(ref, rel=1e-10)
    assert R.rkd_angle(4.0 * t @ _orthogonal(6, seed=2), t).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_accepts_maps_and_needs_enough_rows():
    s, t = _randn(4, 2, 3, 3, seed=7), _randn(4, 5, seed=8)  # a CNN map vs an MLP vector
    assert R.rkd_distance(s, t).item() == pytest.approx(R.rkd_distance(s.flatten(1), t).item())
    with pytest.raises(ValueError, match="at least 2"):
        R.rkd_distance(_randn(1, 3), _randn(1, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        R.rkd_angle(_randn(4, 3), _randn(5, 3))


# --------------------------------------------------------------------------- SP


def test_similarity_preserving_hand_value():
    # student rows orthonormal: G = I; teacher rows identical: every entry 1/sqrt(3).
    # ||I - J/sqrt3||_F^2 = 3 (1 - 1/sqrt3)^2 + 6/3 = 6 - 2 sqrt3, over b^2 = 9.
    s = torch.eye(3, dtype=D)
    t = torch.ones(3, 4, dtype=D)
    assert R.similarity_preserving(s, t).item() == pytest.approx((6 - 2 * math.sqrt(3)) / 9, rel=1e-12)
    g = R.similarity_matrix(_randn(5, 2, 3, 3, seed=1))
    torch.testing.assert_close(g.norm(dim=1), torch.ones(5, dtype=D))  # rows of unit L2 norm


def test_similarity_preserving_invariances():
    s, t = _randn(6, 4, seed=2), _randn(6, 7, seed=3)
    ref = R.similarity_preserving(s, t).item()
    assert R.similarity_preserving(5.0 * s @ _orthogonal(4), 0.1 * t).item() == pytest.approx(ref, rel=1e-10)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert R.similarity_preserving(s[perm], t[perm]).item() == pytest.approx(ref, rel=1e-10)
    assert R.similarity_preserving(2.0 * t @ _orthogonal(7, seed=4), t).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- PKT


def test_pkt_hand_value():
    # student: two orthogonal vectors -> kernel [[1, 1/2], [1/2, 1]] -> rows (2/3, 1/3), (1/3, 2/3);
    # teacher: two identical vectors -> rows (1/2, 1/2).  Each row's KL is (1/2) log(9/8); the
    # loss averages the four terms: log(9/8) / 4.
    s = torch.eye(2, dtype=D)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    torch.testing.assert_close(R.cosine_conditional(s), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]], dtype=D))
    assert R.pkt(s, t).item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-6)


def test_pkt_invariances_and_sign():
    s, t = _randn(6, 4, seed=4), _randn(6, 5, seed=5)
    ref = R.pkt(s, t).item()
    assert ref > 0
    row_scale = torch.rand(6, 1, generator=torch.Generator().manual_seed(1), dtype=D) + 0.5
    assert R.pkt(row_scale * s @ _orthogonal(4), 3.0 * t).item() == pytest.approx(ref, rel=1e-6)
    assert R.pkt(9.0 * t, t).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- CRD


def test_crd_scores_hand_values_and_both_negative_layouts():
    a = torch.tensor([[1.0, 0.0]], dtype=D)
    pos = torch.tensor([[1.0, 0.0]], dtype=D)
    neg = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=D)
    expected = torch.exp(torch.tensor([[2.0, 0.0, -2.0]], dtype=D))  # <a, v> / 0.5
    torch.testing.assert_close(R.crd_scores(a, pos, neg, temperature=0.5), expected)
    torch.testing.assert_close(R.crd_scores(a, pos, neg[None], temperature=0.5), expected)
    # half precision is computed in float32 (e^{1/0.07} overflows float16)
    h = R.crd_scores(a.half(), pos.half(), neg.half(), temperature=0.07)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()


def test_crd_nce_hand_value():
    # P = (2, 1), K = 1 negative, n_data = 1: K P_n = 1.  h+ = 2/3, 1 - h- = 1/2: loss = log 3.
    scores = torch.tensor([[2.0, 1.0]], dtype=D)
    assert R.crd_nce_loss(scores, z=1.0, n_data=1, eps=0.0).item() == pytest.approx(math.log(3), rel=1e-12)
    assert R.crd_normaliser(torch.tensor([[1.0, 3.0]]), 10).item() == pytest.approx(20.0)


def test_crd_nce_rewards_the_positive_and_punishes_negatives():
    base = torch.tensor([[5.0, 1.0, 1.0]], dtype=D)
    loss = lambda x: R.crd_nce_loss(x, z=4.0, n_data=100).item()  # noqa: E731
    assert loss(base * torch.tensor([2.0, 1.0, 1.0], dtype=D)) < loss(base)
    assert loss(base * torch.tensor([1.0, 2.0, 1.0], dtype=D)) > loss(base)
    with pytest.raises(ValueError, match="negative"):
        R.crd_nce_loss(base[:, :1], z=1.0, n_data=10)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn", [R.rkd_distance, R.rkd_angle, R.similarity_preserving, R.pkt], ids=lambda f: f.__name__)
def test_gradcheck(fn):
    s = _randn(5, 3, seed=11).requires_grad_()
    t = _randn(5, 4, seed=12)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_gradcheck_crd():
    a = torch.nn.functional.normalize(_randn(3, 4, seed=13), dim=1).requires_grad_()
    pos = torch.nn.functional.normalize(_randn(3, 4, seed=14), dim=1)
    neg = torch.nn.functional.normalize(_randn(6, 4, seed=15), dim=1)

    def f(x):
        return R.crd_nce_loss(R.crd_scores(x, pos, neg, temperature=0.5), z=8.0, n_data=6)

    assert torch.autograd.gradcheck(f, (a,))
