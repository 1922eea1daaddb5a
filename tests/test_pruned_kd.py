"""KD on pruned data (Ben-Baruch et al. 2025): the EL2N score, the subset selection, the
keep-fraction -> KD-weight rule and the recipe end to end on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_cfg
from distillery.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_el2n_matches_a_hand_computation():
    from distillery.recipes.pruned_kd import el2n

    # Row 0: logits (0, ln 3) -> p = (1/4, 3/4), y = 1 -> ‖(1/4, -1/4)‖ = √2/4.
    # Row 1: uniform over 3 classes, y = 0 -> ‖(-2/3, 1/3, 1/3)‖ = √(6/9).
    # Row 2: confident and wrong -> √2 in the limit.
    logits = torch.tensor([[0.0, math.log(3.0), -1e4], [0.0, 0.0, 0.0], [100.0, 0.0, 0.0]], dtype=torch.float64)
    # row 0 has a third class with zero probability, so its norm is that of the 2-class case
    scores = el2n(logits, torch.tensor([1, 0, 2]))
    assert scores[0] == pytest.approx(math.sqrt(2) / 4, rel=1e-12)
    assert scores[1] == pytest.approx(math.sqrt(6 / 9), rel=1e-12)
    assert scores[2] == pytest.approx(math.sqrt(2), rel=1e-12)
    # Gradient of the score w.r.t. the logits is the paper's norm differentiated: check numerically.
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: el2n(z, torch.tensor([0, 1, 4, 2])), (x,))
    with pytest.raises(ConfigError, match="class ids"):
        el2n(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_subset_has_round_f_n_rows_and_keeps_the_hardest_or_easiest():
    from distillery.recipes.pruned_kd import select_subset

    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.9, 0.0, 0.2, 0.6, 0.4])
    hard = select_subset(10, 0.3, scores=scores, keep="hard")
    assert hard.tolist() == [1, 3, 5]                     # 0.9, 0.9, 0.7
    easy = select_subset(10, 0.25, scores=scores, keep="easy")  # round(2.5) = 2 (banker's rounding)
    assert easy.tolist() == [2, 6]                         # 0.0, 0.1
    tie = select_subset(10, 0.1, scores=scores, keep="hard")
    assert tie.tolist() == [1]                             # tie 0.9 at rows 1 and 5: the first row wins
    for f in (0.01, 0.1, 0.33, 0.5, 0.99, 1.0):
        g = torch.Generator().manual_seed(0)
        rows = select_subset(997, f, generator=g)
        assert len(rows) == max(1, round(f * 997)) and len(set(rows.tolist())) == len(rows)
        assert torch.all(rows[1:] > rows[:-1]) and rows.min() >= 0 and rows.max() < 997
    a = select_subset(100, 0.5, generator=torch.Generator().manual_seed(1))
    b = select_subset(100, 0.5, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)  # a new random subset per seed
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="keep fraction"):
            select_subset(10, bad)
    with pytest.raises(ConfigError, match="hard' or 'easy"):
        select_subset(10, 0.5, scores=scores, keep="medium")
    with pytest.raises(ConfigError, match="one value per training row"):
        select_subset(10, 0.5, scores=scores[:9])


def test_adaptive_alpha_grows_as_the_keep_fraction_shrinks():
    from distillery.recipes.pruned_kd import adaptive_alpha

    assert adaptive_alpha(1.0) == pytest.approx(0.5)
    assert adaptive_alpha(0.5) == pytest.approx(0.75)
    assert adaptive_alpha(0.1) == pytest.approx(0.95)
    assert adaptive_alpha(0.3, alpha_full=0.2, alpha_empty=0.9) == pytest.approx(0.2 + 0.7 * 0.7)
    values = [adaptive_alpha(f) for f in (0.05, 0.1, 0.3, 0.5, 0.9, 1.0)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ConfigError, match="less data must never"):
        adaptive_alpha(0.5, alpha_full=0.9, alpha_empty=0.5)


def _teacher(tmp_path):
    from distillery.engine import fit

    cfg = tiny_cfg(tmp_path, name="teacher", student={"arch": "mlp", "kwargs": {"hidden": [64]}}, train={"epochs": 4})
    return fit(cfg).run_dir


def test_recipe_end_to_end_on_digits(tmp_path):
    from distillery.config import load_config
    from distillery.data import load_data
    from distillery.recipes.pruned_kd import pruning_scores, run_pruned_kd, select_subset

    teacher = _teacher(tmp_path)
    cfg = tiny_cfg(tmp_path, name="pkd", teacher={"run": str(teacher)},
                   method={"name": "kd", "params": {"temperature": 2.0, "alpha": 0.9}}, train={"epochs": 2})
    data = load_data(cfg.data)
    n = len(data.train)
    result = run_pruned_kd(cfg, [0.2, 1.0], scorer="el2n", keep="hard", variants=("ce", "kd", "adaptive"),
                           score_epochs=1, score_seeds=2, data=data)
    series = tmp_path / "runs" / "pkd"
    by = {(r["fraction"], r["variant"]): r for r in result["rows"]}
    assert by[(0.2, "ce")]["train_rows"] == round(0.2 * n) and by[(1.0, "kd")]["train_rows"] == n
    assert by[(0.2, "ce")]["alpha"] == 0.0 and by[(0.2, "kd")]["alpha"] == 0.9
    assert by[(0.2, "adaptive")]["alpha"] == pytest.approx(0.9) and by[(1.0, "adaptive")]["alpha"] == pytest.approx(0.5)
    # Each run trained on the subset the scores pick, with the weight the rule gives.
    run = load_config(series / "f0.2-el2n-hard-a0.9-s0" / "config.yaml")
    assert run.method.name == "kd" and run.method.params["alpha"] == pytest.approx(0.9)
    assert load_config(series / "f0.2-el2n-hard-ce-s0" / "config.yaml").teacher is None
    summary = json.loads((series / "f0.2-el2n-hard-a0.9-s0" / "summary.json").read_text())
    assert summary["train_samples"] == round(0.2 * n)
    scores = pruning_scores(cfg, data, "el2n", series=series, score_epochs=1, score_seeds=2)  # reuses the probes
    kept = select_subset(n, 0.2, scores=scores, keep="hard")
    assert scores[kept].min() >= scores[~torch.isin(torch.arange(n), kept)].max()
    # Adaptive α(0.2) = 0.9 = the fixed α: one shared training, hence identical results; the CE
    # run never consults the teacher, the KD runs do.
    assert by[(0.2, "adaptive")]["run"] == by[(0.2, "kd")]["run"] == "f0.2-el2n-hard-a0.9-s0"
    assert summary["teacher_test_accuracy"] is not None
    assert "teacher_test_accuracy" not in json.loads((series / "f0.2-el2n-hard-ce-s0" / "summary.json").read_text())
    md = (series / "pruned_kd.md").read_text()
    assert "| 0.2 |" in md and "adaptive" in md and json.loads((series / "pruned_kd.json").read_text())["pool_rows"] == n

    # Finished runs are reused, not retrained; the whole-pool runs are shared with another scorer.
    mtime = (series / "f1-all-a0.9-s0" / "model.safetensors").stat().st_mtime
    again = run_pruned_kd(cfg, [1.0], scorer="random", variants=("kd",), data=data)
    assert (series / "f1-all-a0.9-s0" / "model.safetensors").stat().st_mtime == mtime
    assert again["rows"][0]["test_accuracy"] == pytest.approx(by[(1.0, "kd")]["test_accuracy"])

    # The teacher's own EL2N: no training, one score per row, low on rows it fits.
    t_scores = pruning_scores(cfg, data, "teacher_el2n", series=series)
    assert t_scores.shape == (n,) and 0 <= t_scores.min() and t_scores.max() <= math.sqrt(2) + 1e-9
    assert t_scores.median() < 0.5


def test_bad_recipe_input_names_the_problem(tmp_path):
    from distillery.recipes.pruned_kd import run_pruned_kd

    with pytest.raises(ConfigError, match="method kd"):
        run_pruned_kd(tiny_cfg(tmp_path), [0.5])
    kd = tiny_cfg(tmp_path, method={"name": "kd", "params": {}}, teacher={"run": str(tmp_path)})
    with pytest.raises(ConfigError, match="keep fraction"):
        run_pruned_kd(kd, [0.5, 2.0])
    with pytest.raises(ConfigError, match="scorer must be"):
        run_pruned_kd(kd, [0.5], scorer="forgetting")
    with pytest.raises(ConfigError, match="variant must be"):
        run_pruned_kd(kd, [0.5], variants=("ce", "distill"))


def test_cli_prune_kd_prints_the_table_and_refuses_bad_fractions(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app

    teacher = _teacher(tmp_path)
    raw = tiny_cfg(tmp_path, name="cli-pkd", teacher={"run": str(teacher)},
                   method={"name": "kd", "params": {"temperature": 2.0, "alpha": 0.9}},
                   train={"epochs": 1}).model_dump(mode="json")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["prune-kd", str(path), "--fractions", "0.5", "--variants", "ce,kd"])
    assert res.exit_code == 0, res.output
    assert "pruned-data KD" in res.output and "0.5" in res.output
    bad = CliRunner().invoke(app, ["prune-kd", str(path), "--fractions", "half"])
    assert bad.exit_code != 0 and "--fractions must be a list of numbers" in bad.output and "Traceback" not in bad.output
