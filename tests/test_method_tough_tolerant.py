"""Regression distillation: KD-Loss with a tough and a tolerant teacher (Fard & Mahoor 2022),
ASM soft targets, plain regression KD, and the methods end to end on diabetes."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery.losses import regression as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, A_NEG, BETA = 0.9, -0.45, 0.15


def _weight_by_regions(p: float, t: float, g: float) -> float:
    """The assistive weight written region by region, for one element (teacher mirrored to the
    student's side of the truth, boundary at beta of the teacher's error)."""
    d_t = abs(t - g)
    if p == g:
        return A_NEG  # P at G: the closed edge of the (then empty) negative region; |T^ - P| = 0 there anyway
    if d_t == 0:
        return 0.0  # a perfect teacher assists nowhere
    dist = abs(p - g)  # distance of P from G, on its own side
    if dist > d_t:
        return A  # beyond the (reflected) teacher: pull towards it
    if dist >= BETA * d_t:
        return A_NEG  # between the boundary and the teacher (both ends included): push on to the truth
    return 0.0  # inside the truth's neighbourhood


def test_reflect_mirrors_the_teacher_onto_the_students_side():
    g = torch.tensor([0.0, 0.0, 1.0, 1.0])
    t = torch.tensor([2.0, -2.0, 0.5, 0.5])
    p = torch.tensor([-1.0, -1.0, 3.0, 0.0])
    assert R.reflect(t, p, g).tolist() == [-2.0, -2.0, 1.5, 0.5]


@pytest.mark.parametrize("p, t, g, w", [
    (2.0, 1.0, 0.0, A),         # beyond the teacher, teacher above the truth
    (0.5, 1.0, 0.0, A_NEG),     # between the boundary (0.15) and the teacher
    (0.1, 1.0, 0.0, 0.0),       # inside the truth's neighbourhood
    (-2.0, 1.0, 0.0, A),        # other side of the truth: the teacher is reflected to -1
    (-0.5, 1.0, 0.0, A_NEG),
    (-0.1, 1.0, 0.0, 0.0),
    (2.0, -1.0, 0.0, A),        # a teacher below the truth acts like one above (only its error counts)
    (1.0, 1.0, 0.0, A_NEG),     # exactly at the teacher: closed edge of the negative region
    (0.15, 1.0, 0.0, A_NEG),    # exactly at the boundary
    (3.0, 5.0, 5.0, 0.0),       # a perfect teacher assists nowhere
])
def test_assistive_weight_regions_by_hand(p, t, g, w):
    got = R.assistive_weights(torch.tensor([p]), torch.tensor([t]), torch.tensor([g]),
                              alpha=A, alpha_neg=A_NEG, beta=BETA)
    assert float(got) == pytest.approx(w)
    assert _weight_by_regions(p, t, g) == pytest.approx(w)


def test_assistive_weights_match_the_regions_on_random_values():
    gen = torch.Generator().manual_seed(0)
    p, t, g = (torch.randn(2000, generator=gen, dtype=torch.float64) for _ in range(3))
    got = R.assistive_weights(p, t, g, alpha=A, alpha_neg=A_NEG, beta=BETA)
    want = torch.tensor([_weight_by_regions(*map(float, v)) for v in zip(p, t, g)], dtype=torch.float64)
    assert torch.equal(got, want)
    assert {float(x) for x in got.unique()} == {A, A_NEG, 0.0}  # every region occurs


def test_assistive_loss_values_and_gradient():
    g = torch.zeros(3, dtype=torch.float64)
    t = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    p = torch.tensor([2.0, 0.5, 0.1], dtype=torch.float64, requires_grad=True)
    loss = R.assistive_loss(p, t, g, alpha=A, alpha_neg=A_NEG, beta=BETA)
    # |T^ - P|: 1, 0.5, 0.9 (teacher -1 reflected to +1); weights A, A_NEG, 0
    assert float(loss.detach()) == pytest.approx((A * 1.0 + A_NEG * 0.5 + 0.0) / 3)
    (grad,) = torch.autograd.grad(loss, p)
    # d/dP of w |T^ - P| = -w sign(T^ - P): towards the teacher beyond it, away from it between
    assert grad.tolist() == pytest.approx([A / 3, -A_NEG / 3, 0.0])
    # away from region edges the loss is smooth in P: gradcheck in float64
    q = torch.tensor([2.0, 0.5, -3.0, 0.05], dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: R.assistive_loss(x, tt, torch.zeros(4, dtype=torch.float64),
                                                        alpha=A, alpha_neg=A_NEG, beta=BETA), (q,))


def test_assistive_loss_pulls_the_student_towards_the_truth():
    """Gradient steps on ALoss alone: beyond the teacher the student is pulled in to it, between
    the teacher and the boundary it is pushed on towards the truth, and it stops at the truth's
    neighbourhood (beta * |T - G| = 0.15) without crossing the truth."""
    g, t = torch.zeros(2), torch.ones(2)
    p = torch.tensor([3.0, 0.8], requires_grad=True)
    path = []
    for _ in range(200):
        loss = R.assistive_loss(p, t, g, alpha=A, alpha_neg=A_NEG, beta=BETA)
        (grad,) = torch.autograd.grad(loss, p)
        with torch.no_grad():
            p -= 0.2 * grad
        path.append(p.detach().clone())
    path = torch.stack(path)
    assert (path[1:, 0] <= path[:-1, 0]).all() and (path > 0.1).all()  # monotone, never across the truth
    assert ((0.1 < p) & (p < BETA)).all()


def test_main_loss_branches_continuity_and_gradient():
    g = torch.zeros(2, dtype=torch.float64)
    tol = torch.tensor([0.5, 0.5], dtype=torch.float64)
    p = torch.tensor([0.2, -2.0], dtype=torch.float64)
    # d = 0.2 <= 0.5: 3 * 0.2;  d = 2 > 0.5: 4 + 3 * 0.5 - 0.25
    assert float(R.main_loss(p, g, tol, slope=3.0)) == pytest.approx((0.6 + 4 + 1.5 - 0.25) / 2)
    edge = torch.tensor([0.5], dtype=torch.float64)
    below, above = (float(R.main_loss(edge + e, torch.zeros(1, dtype=torch.float64), tol[:1])) for e in (-1e-9, 1e-9))
    assert below == pytest.approx(above, abs=1e-7) == pytest.approx(1.5, abs=1e-7)
    x = torch.tensor([0.2, -2.0, 1.3], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: R.main_loss(v, torch.zeros(3, dtype=torch.float64),
                                                   torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)), (x,))


def test_tough_tolerant_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(1)
    p, y, tough, tol = (torch.randn(8, 3, generator=gen) for _ in range(4))
    terms = R.tough_tolerant(p, y, tough, tol, main_weight=2.0, tough_weight=0.5, tolerant_weight=0.25)
    assert set(terms) == {"main", "tough", "tolerant"}
    assert float(terms["main"]) == pytest.approx(2.0 * float(R.main_loss(p, y, tol)))
    assert float(terms["tough"]) == pytest.approx(0.5 * float(R.assistive_loss(p, tough, y, alpha=0.9, alpha_neg=-0.45)))
    assert float(terms["tolerant"]) == pytest.approx(0.25 * float(R.assistive_loss(p, tol, y, alpha=0.8, alpha_neg=-0.4)))


def test_regression_kd_formula_and_no_teacher_gradient():
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0]], requires_grad=True)
    y = torch.tensor([[1.0, 4.0]])
    loss = R.regression_kd(s, t, y, alpha=0.25)
    assert float(loss.detach()) == pytest.approx(0.25 * (1 + 4) / 2 + 0.75 * (0 + 4) / 2)
    loss.backward()
    assert t.grad is None and s.grad is not None


# ---------------------------------------------------------------------------------------------
# ASM soft targets


def test_shape_model_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    mean, basis, eig = R.fit_shape_model(torch.from_numpy(x), 3)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(eig.numpy(), np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1][:3], rtol=1e-9)
    np.testing.assert_allclose(basis.numpy() @ basis.numpy().T, vt[:3].T @ vt[:3], atol=1e-10)  # same subspace
    soft = R.asm_project(torch.from_numpy(x), mean, basis, eig, clip=None).numpy()
    np.testing.assert_allclose(soft, x.mean(0) + centred @ vt[:3].T @ vt[:3], atol=1e-10)
    # all components, no clip: the identity; fewer components: smoother (less variance)
    full = R.fit_shape_model(torch.from_numpy(x), 6)
    np.testing.assert_allclose(R.asm_project(torch.from_numpy(x), *full, clip=None).numpy(), x, atol=1e-9)
    assert soft.var(0).sum() < x.var(0).sum()


def test_asm_clip_bounds_the_shape_parameters():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [30.0, 30.0]], dtype=torch.float64)
    mean, basis, eig = R.fit_shape_model(x, 1)
    soft = R.asm_project(x, mean, basis, eig, clip=1.0)
    b = (soft - mean) @ basis
    assert (b.abs() <= eig.sqrt() + 1e-9).all() and b.abs().max() == pytest.approx(float(eig.sqrt()))
    with pytest.raises(ValueError, match="pca_components must be between 1 and"):
        R.fit_shape_model(x, 3)


# ---------------------------------------------------------------------------------------------
# The methods, end to end on diabetes


def _teacher(tmp_path, name, **data):
    from distillery.engine import fit

    cfg = tiny_cfg(tmp_path, name=name, data={"name": "diabetes", "batch_size": 32, **data}, method={"name": "mse"},
                   student={"arch": "mlp", "kwargs": {"hidden": [32]}},
                   train={"epochs": 4, "optimizer": {"name": "adam", "lr": 0.01}})
    return fit(cfg).run_dir


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return (_teacher(root, "tolerant", soft_targets={"pca_components": 1, "clip": 1.0}), _teacher(root, "tough"))


def _student_cfg(tmp_path, teachers, name="student", **over):
    tol, tough = teachers
    return tiny_cfg(tmp_path, name=name, data={"name": "diabetes", "batch_size": 32},
                    student={"arch": "mlp", "kwargs": {"hidden": [8]}},
                    teacher={"ensemble": [{"run": str(tol)}, {"run": str(tough)}], "combine": "mean_logits"},
                    method={"name": "tough_tolerant"}, train={"epochs": 3, "optimizer": {"name": "adam", "lr": 0.01}},
                    **over)


def test_members_are_read_in_order(tmp_path, teachers):
    """members.0 is the tolerant teacher, members.1 the tough one: the method's terms equal the loss
    computed from each teacher run separately."""
    from distillery.data import load_data
    from distillery.engine.trainer import load_teacher
    from distillery.methods import get_spec
    from distillery.methods.base import ModelOutput, Progress
    from distillery.models import forward_logits
    from distillery.taps import Taps

    cfg = _student_cfg(tmp_path, teachers)
    data = load_data(cfg.data)
    ensemble = load_teacher(cfg, data)
    spec = get_spec("tough_tolerant")
    method = spec.cls(spec.validate_params({}), student=torch.nn.Linear(10, 1), teacher_layers=[], num_classes=1)
    x, y = data.train.inputs[:16], data.train.labels[:16]
    with Taps(ensemble, method.teacher_taps) as taps, torch.no_grad():
        forward_logits(ensemble, x)
        feats = taps.collect()
    tol, tough = (forward_logits(m, x).detach() for m in ensemble.members)
    s = torch.randn(16, 1)
    terms = method(ModelOutput(s), ModelOutput(None, feats), y, Progress(0, 0, 1))
    want = R.tough_tolerant(s, y, tough, tol)
    assert all(torch.allclose(terms[k], want[k]) for k in want)
    assert not torch.allclose(tol, tough)  # the two teachers really differ


def test_tough_tolerant_fits_and_resumes(tmp_path, teachers, monkeypatch):
    from distillery.engine import fit

    s = fit(_student_cfg(tmp_path, teachers)).summary
    assert s["method"] == "tough_tolerant" and "test_accuracy" not in s
    assert np.isfinite(s["test_rmse"]) and np.isfinite(s["teacher_test_rmse"])
    import json

    rows = [json.loads(line) for line in (tmp_path / "runs" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_main", "train_tough", "train_tolerant", "val_rmse", "val_r2"} <= set(rows[-1])
    resumed = interrupt_then_resume(_student_cfg(tmp_path, teachers, name="again"), monkeypatch, at_step=12)
    assert same_weights(resumed, SimpleNamespace(run_dir=tmp_path / "runs" / "student"))


def test_regression_kd_runs(tmp_path, teachers):
    from distillery.engine import fit

    _, tough = teachers
    kd = fit(tiny_cfg(tmp_path, name="kd", data={"name": "diabetes"}, teacher={"run": str(tough)},
                      method={"name": "regression_kd", "params": {"alpha": 0.5}})).summary
    assert np.isfinite(kd["test_rmse"]) and kd["teacher_test_rmse"] > 0
