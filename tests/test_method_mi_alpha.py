"""MI-alpha: the interpolated MI bound against naive loops of Poole et al.'s definition, its two end
points (InfoNCE, NWJ/TUBA), a Monte-Carlo check on correlated Gaussians of known MI, gradients, bad
inputs; the method's critic, terms and gradient paths, and a short CNN teacher -> MLP student run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses.mi_alpha import interpolated_mi_bound, log_loo_mean_exp
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _naive_bound(s, alpha, log_a):
    """Poole et al. 2019 eq. (11)-(12) term by term: every leave-one-out baseline summed out by hand."""
    b = s.shape[0]
    e = [[math.exp(float(s[i, j])) for j in range(b)] for i in range(b)]

    def base(i, left_out):  # alpha * m(y_i; x without x_left_out) + (1 - alpha) * a(y_i)
        m = sum(e[i][k] for k in range(b) if k != left_out) / (b - 1)
        return alpha * m + (1 - alpha) * math.exp(float(log_a[i]))

    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    joint = sum(math.log(e[i][i] / base(i, j)) for i, j in pairs) / len(pairs)
    marginal = sum(e[i][j] / base(i, i) for i, j in pairs) / len(pairs)
    return 1 + joint - marginal


# --------------------------------------------------------------------------- the bound


def test_leave_one_out_log_mean_exp_and_its_stability():
    s = _randn(5, 5, seed=1, scale=2.0)
    out = log_loo_mean_exp(s)
    for i in range(5):
        for j in range(5):
            ref = math.log(sum(math.exp(float(s[i, k])) for k in range(5) if k != j) / 4)
            assert out[i, j].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # A dominating positive (60 nats above the rest): leaving it out must still be exact in float32.
    s[0, 0] = 60.0
    torch.testing.assert_close(log_loo_mean_exp(s.float()).double(), log_loo_mean_exp(s), rtol=1e-5, atol=1e-5)
    assert log_loo_mean_exp(s)[0, 0].item() == pytest.approx(math.log(sum(math.exp(float(s[0, k])) for k in range(1, 5)) / 4))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.9, 1.0])
def test_matches_the_definition_term_by_term(alpha):
    s, log_a = _randn(6, 6, seed=2), _randn(6, seed=3)
    assert interpolated_mi_bound(s, alpha=alpha, log_baseline=log_a).item() == pytest.approx(
        _naive_bound(s, alpha, log_a), rel=1e-10)


def test_alpha_one_is_infonce_over_b_minus_one_candidates():
    s = _randn(5, 5, seed=4, scale=3.0)
    b, total = 5, []
    for i in range(b):
        for j in range(b):
            if j == i:
                continue
            keep = [k for k in range(b) if k != j]  # the positive i stays, negative j is dropped
            ce = F.cross_entropy(s[i, keep][None], torch.tensor([keep.index(i)]))
            total.append(math.log(b - 1) - ce.item())
    expected = sum(total) / len(total)
    # The baseline does not enter at alpha = 1.
    for log_a in (1.0, _randn(5, seed=5)):
        assert interpolated_mi_bound(s, alpha=1.0, log_baseline=log_a).item() == pytest.approx(expected, rel=1e-12)
    assert expected <= math.log(b - 1)  # InfoNCE is capped at log K


def test_alpha_zero_is_nwj_and_tuba():
    s, b = _randn(6, 6, seed=6), 6
    diag = sum(float(s[i, i]) for i in range(b)) / b
    off = sum(math.exp(float(s[i, j]) - 1) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    assert interpolated_mi_bound(s, alpha=0.0).item() == pytest.approx(diag - off, rel=1e-12)  # NWJ: E_p f - E_q e^(f-1)
    log_a = _randn(b, seed=7)
    tuba = 1 + sum(float(s[i, i] - log_a[i]) for i in range(b)) / b - sum(
        math.exp(float(s[i, j] - log_a[i])) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    assert interpolated_mi_bound(s, alpha=0.0, log_baseline=log_a).item() == pytest.approx(tuba, rel=1e-12)


def _gaussian_pair(n, rho, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def _pmi(x, y, rho):
    """log p(y|x) / p(y) for every pair, [i, j] = pmi(x_j, y_i): the optimal critic (up to constants)."""
    v = 1 - rho**2
    return -(y[:, None] - rho * x[None, :]) ** 2 / (2 * v) - 0.5 * math.log(v) + y[:, None] ** 2 / 2


def test_correlated_gaussians_with_the_optimal_critic():
    rho = 0.5
    true_mi = -0.5 * math.log(1 - rho**2)  # 0.1438 nats
    est = {0.0: [], 0.5: [], 1.0: []}
    for seed in range(10):
        x, y = _gaussian_pair(1000, rho, seed)
        pmi = _pmi(x, y, rho)
        # f* = 1 + pmi makes NWJ tight (Nguyen et al. 2010); InfoNCE's optimum is pmi up to a constant.
        for alpha in est:
            est[alpha].append(interpolated_mi_bound(1 + pmi, alpha=alpha).item())
    mean = {a: sum(v) / len(v) for a, v in est.items()}
    # Standard error of each mean ~0.004 here: 0.015 is ~3.5 of them.
    assert mean[0.0] == pytest.approx(true_mi, abs=0.015)  # tight and unbiased
    for alpha, value in mean.items():
        assert value <= true_mi + 0.015, alpha  # a lower bound, up to Monte-Carlo error
    assert mean[1.0] == pytest.approx(true_mi, abs=0.015)  # K = 999 candidates: log K is far above I


def test_infonce_end_is_capped_at_log_k_and_alpha_interpolates():
    rho, b = 0.99, 4
    true_mi = -0.5 * math.log(1 - rho**2)  # 1.96 nats > log(b - 1) = 1.10
    est = {a: [] for a in (0.0, 0.5, 1.0)}
    for seed in range(300):
        x, y = _gaussian_pair(b, rho, seed)
        for alpha in est:
            est[alpha].append(interpolated_mi_bound(1 + _pmi(x, y, rho), alpha=alpha).item())
    mean = {a: sum(v) / len(v) for a, v in est.items()}
    assert max(est[1.0]) <= math.log(b - 1) + 1e-12  # every single InfoNCE estimate obeys the cap
    assert mean[0.0] == pytest.approx(true_mi, abs=0.25)  # NWJ is unbiased (but noisy at K = 3)
    assert mean[1.0] < mean[0.5] < true_mi + 0.25  # the interpolation lifts the cap


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_gradcheck(alpha):
    s = _randn(4, 4, seed=8).requires_grad_()
    log_a = _randn(4, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: interpolated_mi_bound(a, alpha=alpha, log_baseline=b), (s, log_a))


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        interpolated_mi_bound(_randn(3, 4), alpha=0.5)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        interpolated_mi_bound(_randn(1, 1), alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        interpolated_mi_bound(_randn(3, 3), alpha=1.5)
    with pytest.raises(ValueError, match="one value per row"):
        interpolated_mi_bound(_randn(3, 3), alpha=0.5, log_baseline=_randn(4))
    with pytest.raises(ValueError, match="method.params.alpha"):
        methods.get_spec("mi_alpha").validate_params({"alpha": -0.1})


# --------------------------------------------------------------------------- the method


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, **params):
    spec = methods.get_spec("mi_alpha")
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)


def _outputs(method, student, teacher, x):
    with Taps(student, method.student_taps) as st, Taps(teacher, method.teacher_taps) as tt:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x), ModelOutput(t_logits, tt.collect())


@pytest.mark.parametrize("baseline", ["learned", "constant"])
def test_terms_and_gradient_paths(baseline):
    torch.manual_seed(0)
    teacher, student = _model("cnn", width=8), _model("mlp", hidden=[12])  # penultimate widths 32 and 12
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    method = _method(student, baseline=baseline, alpha=0.5, embed_dim=6, hidden_dim=10, mi_weight=2.0, kd_weight=0.5)
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, x))
    assert method.critic_s[0].in_features == 12 and method.critic_t[0].in_features == 32
    assert (method.baseline_fn is not None) == (baseline == "learned")
    s_out, t_out = _outputs(method, student, teacher, x)
    terms = method(s_out, t_out, y, Progress(epoch=0.0, step=0, total_steps=1))
    assert set(terms) == {"mi", "ce", "kd"}
    s, t = s_out.features["head:input"], t_out.features["head:input"]
    scores = method.critic_t(t) @ method.critic_s(s).T
    log_a = method.baseline_fn(t).squeeze(1) if baseline == "learned" else 1.0
    assert terms["mi"].item() == pytest.approx(-2.0 * interpolated_mi_bound(scores, alpha=0.5, log_baseline=log_a).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s_out.logits, y).item(), rel=1e-6)
    params = [student.layers[0][0].weight, student.head.weight, method.critic_s[0].weight, method.critic_t[0].weight]
    if baseline == "learned":
        params.append(method.baseline_fn[0].weight)
    g = torch.autograd.grad(terms["mi"], params, allow_unused=True)
    assert g[0].abs().sum() > 0 and g[1] is None and all(gi.abs().sum() > 0 for gi in g[2:])
    assert any(k.startswith("critic_s.") for k in method.state_dict())  # checkpointed with the method
    # A ragged last batch of one sample has no negatives: the MI term is 0, the others stay.
    one = method(*_outputs(method, student, teacher, x[:1]), y[:1], Progress(epoch=0.0, step=0, total_steps=1))
    assert one["mi"].item() == 0.0 and one["ce"].item() > 0


# --------------------------------------------------------------------------- end to end


def test_cnn_teacher_to_mlp_student_run(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "mlp", "kwargs": {"hidden": [32]}},
                   method={"name": "mi_alpha", "params": {"embed_dim": 16, "hidden_dim": 32}},
                   train={"epochs": 3, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_mi", "train_kd", "train_ce"} <= set(r) for r in rows)
    assert rows[-1]["train_mi"] < rows[0]["train_mi"]  # the bound on I(student; teacher) rises
    assert res.summary["test_accuracy"] > 0.5
