"""Our generalized JSD (plain and chunked) gives TRL's ``GKDTrainer.generalized_jsd_loss`` values.

TRL is a test-only reference (``pip install --no-deps trl``: GKDTrainer lives in
``trl.experimental.gkd`` since TRL 1.x and imports with the transformers / accelerate / datasets
already installed; ``--no-deps`` keeps pip from touching torch). Convention differences, each
tested below:

* beta: the same in both. M = beta * P_teacher + (1 - beta) * Q_student,
  JSD = beta KL(P||M) + (1 - beta) KL(Q||M); beta = 0 is forward KL(P||Q), beta = 1 reverse KL.
* Temperature: TRL divides the logits by T and does not multiply by T^2; ours multiplies by T^2
  (like ``kd``), so ours = T^2 * TRL's, equal at T = 1.
* Reduction: with ``labels``, TRL's 'batchmean' is the sum over non -100 positions divided by
  their count, as ours. Without labels, TRL divides the sum over all (batch, seq) positions by
  the batch size (dim 0), i.e. a per-sequence sum; ours stays a mean over positions, so
  TRL's = seq_len * ours for (batch, seq, vocab) input.
"""

from __future__ import annotations

import os

import pytest
import torch

from distillery.losses.lm import chunked_token_loss
from distillery.losses.logits import jsd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:
    from trl.experimental.gkd import GKDTrainer
except Exception as err:  # noqa: BLE001 -- any import failure means: no reference to compare with
    GKDTrainer = None
    _why = f"trl not importable ({type(err).__name__}: {err}); pip install --no-deps trl"
else:
    _why = ""

pytestmark = [pytestmark, pytest.mark.skipif(GKDTrainer is None, reason=_why)]

D = torch.float64
B, T, V = 2, 6, 9


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=D) * 2).requires_grad_(True)
    t = (torch.randn(B, T, V, generator=g, dtype=D) * 2).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = -100  # a prompt
    y[1, -1] = -100  # padding
    return s, t, y


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_with_labels(beta):
    s, t, y = _inputs()
    ref = GKDTrainer.generalized_jsd_loss(s, t, y, beta=beta)
    ref_grads = torch.autograd.grad(ref, (s, t))
    for ours in (jsd(s, t, y, beta=beta), chunked_token_loss("jsd", s, t, y, chunk_size=4, beta=beta)):
        assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
        for g_ours, g_ref in zip(torch.autograd.grad(ours, (s, t)), ref_grads):
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-13)


def test_temperature_convention_ours_is_t_squared_times_trl():
    s, t, y = _inputs(1)
    temperature = 2.5
    ref = GKDTrainer.generalized_jsd_loss(s, t, y, beta=0.5, temperature=temperature)
    ours = jsd(s, t, y, beta=0.5, temperature=temperature)
    assert ours.item() == pytest.approx(temperature**2 * ref.item(), rel=1e-12)


def test_reduction_without_labels_trl_divides_by_batch_size():
    s, t, _ = _inputs(2)
    ref = GKDTrainer.generalized_jsd_loss(s, t, None, beta=0.3)
    ours = jsd(s, t, beta=0.3)
    assert ref.item() == pytest.approx(T * ours.item(), rel=1e-12)  # per-sequence sum vs per-token mean
