"""Self-distillation with ground-truth weighting (Borup & Andersen 2021): the mixed target, its
limits, the optimal-alpha rule (by hand and on kernel ridge regression, where it is exact), the
method, and the multi-round recipe with resume.  Reference values are computed by hand or with
numpy, never by the function under test."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import tiny_cfg
from distillery import methods
from distillery.errors import ConfigError, DistilleryError
from distillery.losses.self_distillation import ground_truth_mixed_target, optimal_alpha, self_distillation_loss
from distillery.methods.base import ModelOutput, Progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- the loss


def test_mixed_target_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; alpha 0.4 on class 0: [0.4 + 0.6/4, 0.6*3/4] = [0.55, 0.45]
    target = ground_truth_mixed_target(torch.tensor([[0.0, LN3]]), torch.tensor([0]), alpha=0.4)
    torch.testing.assert_close(target, torch.tensor([[0.55, 0.45]]))


def test_loss_by_hand():
    s = torch.tensor([[0.0, LN3]])  # q = [1/4, 3/4]
    t = torch.tensor([[0.0, LN3]])
    value = self_distillation_loss(s, t, torch.tensor([0]), alpha=0.4)
    assert value.item() == pytest.approx(-(0.55 * math.log(0.25) + 0.45 * math.log(0.75)), rel=1e-6)
    # a uniform student costs log C whatever the target
    assert self_distillation_loss(torch.zeros(1, 2), t, torch.tensor([1]), alpha=0.3).item() == pytest.approx(math.log(2))


def test_alpha_one_is_label_ce_and_ignores_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    torch.testing.assert_close(self_distillation_loss(s, t, y, alpha=1.0), F.cross_entropy(s, y))
    torch.testing.assert_close(self_distillation_loss(s, 10 * t, y, alpha=1.0), F.cross_entropy(s, y))


def test_alpha_zero_is_teacher_cross_entropy_kl_plus_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    p = np.exp(t.numpy()) / np.exp(t.numpy()).sum(1, keepdims=True)
    q = np.exp(s.numpy()) / np.exp(s.numpy()).sum(1, keepdims=True)
    kl = (p * np.log(p / q)).sum(1).mean()
    entropy = -(p * np.log(p)).sum(1).mean()
    y = torch.tensor([0, 1, 2, 0])
    assert self_distillation_loss(s, t, y, alpha=0.0).item() == pytest.approx(kl + entropy, rel=1e-12)
    # ... so with alpha 0 the labels do not matter
    assert self_distillation_loss(s, t, torch.tensor([2, 2, 1, 1]), alpha=0.0).item() == pytest.approx(kl + entropy, rel=1e-12)


def test_ignored_positions_and_bad_alpha():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    y = torch.tensor([1, -100, 2])
    expected = self_distillation_loss(s[[0, 2]], t[[0, 2]], y[[0, 2]], alpha=0.3)
    torch.testing.assert_close(self_distillation_loss(s, t, y, alpha=0.3), expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        self_distillation_loss(s, t, torch.tensor([0, 1, 2]), alpha=1.5)
    with pytest.raises(ValueError, match="targets"):
        self_distillation_loss(s, t, None, alpha=0.5)


def test_gradient_matches_closed_form_and_gradcheck():
    # d/ds CE(target, softmax(s)) = softmax(s) - target, per row, divided by the batch size
    s = torch.tensor([[0.3, -0.2, 1.0], [0.0, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    self_distillation_loss(s, t, y, alpha=0.25).backward()
    target = 0.25 * F.one_hot(y, 3).double() + 0.75 * torch.softmax(t, -1)
    torch.testing.assert_close(s.grad, (torch.softmax(s.detach(), -1) - target) / 2)
    assert torch.autograd.gradcheck(lambda z: self_distillation_loss(z, t, y, alpha=0.6), (s.detach().requires_grad_(),))


# ----------------------------------------------------------------------------- the optimal alpha


def test_optimal_alpha_by_hand():
    # r - f0 = [0.5, -0.5], f1 - f0 = [1, -1]: <.,.> = 1, ||.||^2 = 2 -> 0.5
    f1, f0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert optimal_alpha(f1, f0, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.5)
    # class ids: r = [1, 0], f0 = [.5, .5], f1 = [.9, .1]: 0.4 / 0.32 = 1.25, clipped to 1
    f1, f0 = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    assert optimal_alpha(f1, f0, torch.tensor([0]), clip=False).item() == pytest.approx(1.25)
    assert optimal_alpha(f1, f0, torch.tensor([0])).item() == 1.0
    assert optimal_alpha(f1, f0, torch.tensor([1])).item() == 0.0  # -1.25, clipped to 0
    # -100 rows are left out; identical fits: every alpha is the same fit -> 1 (labels)
    f1, f0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert optimal_alpha(f1, f0, torch.tensor([-100, 1]), clip=False).item() == pytest.approx(1.0)
    assert optimal_alpha(f0, f0, torch.tensor([0, 1])).item() == 1.0


def test_optimal_alpha_is_exact_for_kernel_ridge_self_distillation():
    """The paper's setting: kernel ridge regression, where a step's fit is P @ target with
    P = K (K + lambda I)^-1.  Step 2 with weight alpha fits alpha*y + (1-alpha)*yhat1; the closed
    form must equal a brute-force search for the alpha whose fit is closest to the true function."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 15)
    f_true = np.sin(2 * np.pi * x)
    y = f_true + rng.normal(0, 0.5, x.shape)
    k = np.exp(-30.0 * (x[:, None] - x[None, :]) ** 2)
    p = k @ np.linalg.inv(k + 1.0 * np.eye(len(x)))  # regularised enough for 0 < alpha* < 1
    yhat1 = p @ y

    def step2(a):
        return p @ (a * y + (1 - a) * yhat1)

    grid = np.linspace(-1, 3, 40001)
    errors = [np.sum((f_true - step2(a)) ** 2) for a in grid]
    best = grid[int(np.argmin(errors))]
    col = lambda v: torch.tensor(v)[:, None]  # noqa: E731  (one "class")
    a_star = optimal_alpha(col(p @ y), col(p @ yhat1), col(f_true), clip=False).item()
    assert a_star == pytest.approx(best, abs=2e-4) and 0.0 < a_star < 1.0
    np.testing.assert_allclose(step2(a_star), a_star * (p @ y) + (1 - a_star) * (p @ yhat1), atol=1e-12)
    # Against the noisy training labels themselves the rule always asks for alpha > 1 (less
    # regularisation): that is why the recipe scores the fits on held-out labels.
    assert optimal_alpha(col(p @ y), col(p @ yhat1), col(y), clip=False).item() > 1.0


# ----------------------------------------------------------------------------- the method


def test_method_registered_and_wired():
    spec = methods.get_spec("selfdistill")
    assert spec.needs_teacher and "Borup" in spec.paper
    with pytest.raises(ValueError, match="alpha"):
        spec.validate_params({"alpha": 1.2})
    m = spec.cls(spec.validate_params({"alpha": 0.3}), student=torch.nn.Linear(2, 3), teacher_layers=None, num_classes=3)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    terms = m(ModelOutput(s), ModelOutput(t), y, Progress(0.0, 0, 10))
    assert set(terms) == {"selfdistill"}
    torch.testing.assert_close(terms["selfdistill"], self_distillation_loss(s, t, y, alpha=0.3))


# ----------------------------------------------------------------------------- the recipe


def _sd_cfg(tmp_path, **over):
    return tiny_cfg(tmp_path, name="sd", method={"name": "selfdistill"}, teacher={"run": "unused"},
                    train={"epochs": 1, "progress": False, "report": False}, **over)


def test_run_rounds_optimal_then_resume_without_redoing_rounds(tmp_path, monkeypatch):
    from distillery.recipes import self_distillation as recipe

    trained = []
    real_fit = recipe.fit

    def recording_fit(cfg, **kw):
        trained.append(cfg.name)
        return real_fit(cfg, **kw)

    monkeypatch.setattr(recipe, "fit", recording_fit)
    cfg = _sd_cfg(tmp_path)
    first = recipe.run_rounds(cfg, 1)
    assert trained == ["round-0", "round-1-alpha0", "round-1"]
    trained.clear()
    res = recipe.run_rounds(cfg, 2)  # round 0 and round 1 are finished: only round 2 (+ its probe) trains
    assert trained == ["round-2-alpha0", "round-2"]
    rows = json.loads(res.json.read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[:2] == first.rows
    assert rows[0]["alpha"] == 1.0 and all(0.0 <= r["alpha"] <= 1.0 for r in rows)
    assert rows[2]["alpha_probe"] == "round-2-alpha0"
    for r in rows:  # each round ran with the alpha the table reports, distilled from the round before
        run_cfg = yaml.safe_load((res.dir / r["run"] / "config.yaml").read_text())
        if r["round"]:
            assert run_cfg["method"] == {"name": "selfdistill", "params": {"alpha": r["alpha"]}}
            assert run_cfg["teacher"]["run"] == str(res.dir / f"round-{r['round'] - 1}")
        else:
            assert run_cfg["method"]["name"] == "ce" and run_cfg["teacher"] is None
        summary = json.loads((res.dir / r["run"] / "summary.json").read_text())
        assert r["test_accuracy"] == summary["test_accuracy"]
    assert "| 2 |" in res.markdown.read_text()
    trained.clear()
    recipe.run_rounds(cfg, 2)
    assert trained == []


def test_run_rounds_fixed_alpha_and_changed_alpha_refused(tmp_path):
    from distillery.recipes.self_distillation import run_rounds

    cfg = _sd_cfg(tmp_path)
    res = run_rounds(cfg, 1, alpha=0.5)
    assert [r["alpha"] for r in res.rows] == [1.0, 0.5] and res.rows[1]["alpha_probe"] is None
    assert not (res.dir / "round-1-alpha0").exists()
    with pytest.raises(DistilleryError, match="another config"):
        run_rounds(cfg, 1, alpha=0.25)


def test_unfinished_round_is_resumed(tmp_path, monkeypatch):
    from distillery.config import dump_config
    from distillery.engine import RunResult
    from distillery.recipes import self_distillation as recipe

    cfg = _sd_cfg(tmp_path)
    recipe.run_rounds(cfg, 1, alpha=0.5)
    started = cfg.run_dir / "round-2"  # as an interrupted run leaves it: config written, no summary
    started.mkdir()
    round2 = recipe._derive(cfg, cfg.run_dir, "round-2", {"name": "selfdistill", "params": {"alpha": 0.5}},
                            cfg.run_dir / "round-1")
    (started / "config.yaml").write_text(dump_config(round2))
    calls = []
    monkeypatch.setattr(recipe, "fit", lambda c, **kw: calls.append((c.name, kw["resume"])) or
                        RunResult(c.run_dir, {"test_accuracy": 0.5, "val_accuracy": 0.5}, None))
    recipe.run_rounds(cfg, 2, alpha=0.5)
    assert calls == [("round-2", True)]


def test_run_rounds_argument_errors(tmp_path):
    from distillery.recipes.self_distillation import parse_alpha, run_rounds

    assert parse_alpha("optimal") == "optimal" and parse_alpha("0.25") == 0.25
    for bad in ("2", "best"):
        with pytest.raises(ConfigError, match="alpha"):
            parse_alpha(bad)
    with pytest.raises(ConfigError, match="rounds"):
        run_rounds(_sd_cfg(tmp_path), 0)
    with pytest.raises(ConfigError, match="selfdistill"):
        run_rounds(tiny_cfg(tmp_path, method={"name": "kd"}, teacher={"run": "x"}), 1)
    with pytest.raises(ConfigError, match="validation"):
        run_rounds(_sd_cfg(tmp_path, data={"name": "digits", "val_fraction": 0.0}), 1)


def test_cli_self_distill(tmp_path):
    from typer.testing import CliRunner

    from distillery.cli import app

    raw = {"name": "cli", "output_dir": str(tmp_path / "runs"), "data": {"name": "digits", "batch_size": 32},
           "student": {"arch": "mlp", "kwargs": {"hidden": [16]}}, "teacher": {"run": "unused"},
           "method": {"name": "selfdistill"}, "train": {"epochs": 1, "progress": False, "report": False}}
    config = tmp_path / "sd.yaml"
    config.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["self-distill", str(config), "--rounds", "1", "--alpha", "0.7"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "runs" / "cli" / "rounds.json").read_text())["rounds"]
    assert [r["alpha"] for r in rows] == [1.0, 0.7]
    res = runner.invoke(app, ["self-distill", str(config), "--rounds", "1", "--alpha", "1.5"])
    assert res.exit_code == 2 and "alpha" in res.output
