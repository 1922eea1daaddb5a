"""Robust active distillation (Baykal et al. 2023): the selection rules on hand-built tables, the
RAD game's optimum, the query bookkeeping and the recipe end to end on digits."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_cfg
from distillery.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_margin_is_top1_minus_top2_and_picks_the_lowest():
    from distillery.recipes.active_kd import select, student_margin

    # Margins (top-1 minus top-2): 0.5, 0.0, 0.2, 0.9, 0.1, 0.0 -- rows 1 and 5 tie at 0.
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.4, 0.4, 0.2], [0.5, 0.3, 0.2],
                          [0.95, 0.05, 0.0], [0.2, 0.35, 0.45], [0.35, 0.35, 0.3]], dtype=torch.float64)
    assert student_margin(probs).tolist() == pytest.approx([0.5, 0.0, 0.2, 0.9, 0.1, 0.0])
    assert select("margin", 2, probs=probs).tolist() == [1, 5]          # the two zero margins
    assert select("margin", 3, probs=probs).tolist() == [1, 4, 5]       # then 0.1
    assert select("margin", 1, probs=probs).tolist() == [1]             # a tie goes to the first row
    with pytest.raises(ConfigError, match="shape"):
        student_margin(torch.ones(4))


def test_random_is_seeded_distinct_and_sized():
    from distillery.recipes.active_kd import select

    a = select("random", 30, n=100, generator=torch.Generator().manual_seed(3))
    b = select("random", 30, n=100, generator=torch.Generator().manual_seed(3))
    c = select("random", 30, n=100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a.unique()) == 30 and a.min() >= 0 and a.max() < 100
    with pytest.raises(ConfigError, match="per_round must be"):
        select("random", 101, n=100)
    with pytest.raises(ConfigError, match="strategy must be"):
        select("coreset", 1, n=10)


def test_rad_solves_the_game_by_hand():
    """Two rows, gains (1, 0.5), one query.  F(p) = w1 + w2 - k·max(w1, w2), w = (p, 0.5(1 - p)).
    k = 0.25: F rises with p -> query the informative row surely, p = (1, 0).
    k = 0.75: F peaks where w1 = w2, p = (1/3, 2/3): the harder row -- where a teacher mistake would
    cost most -- is down-weighted until its expected gain equals the other's; F = 5/12."""
    from distillery.recipes.active_kd import rad_probabilities, worst_case_gain

    g = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert rad_probabilities(g, 1, 0.25).tolist() == pytest.approx([1.0, 0.0], abs=1e-7)
    p = rad_probabilities(g, 1, 0.75)
    assert p.tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-7)
    assert worst_case_gain(p, g, 0.75) == pytest.approx(5 / 12, abs=1e-7)
    # Equal gains: spread evenly (worst case 1 - k/3) instead of all on one row (1 - k).
    assert rad_probabilities(torch.ones(3, dtype=torch.float64), 1, 0.5).tolist() == pytest.approx([1 / 3] * 3, abs=1e-7)
    # No teacher mistakes: RAD is exactly margin sampling (the B highest gains).
    gains = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5], dtype=torch.float64)
    assert rad_probabilities(gains, 2, 0.0).tolist() == pytest.approx([0, 1, 0, 1, 0], abs=1e-7)
    with pytest.raises(ConfigError, match="teacher mistakes"):
        rad_probabilities(gains, 2, 3.0)


def test_rad_beats_margin_and_uniform_in_the_worst_case():
    from distillery.recipes.active_kd import rad_probabilities, worst_case_gain

    gen = torch.Generator().manual_seed(0)
    gains = torch.rand(300, generator=gen, dtype=torch.float64)
    b, k = 20, 3.0
    p = rad_probabilities(gains, b, k)
    assert p.sum().item() == pytest.approx(b, abs=1e-6) and p.min() >= 0 and p.max() <= 1
    top = torch.zeros(300, dtype=torch.float64)
    top[gains.topk(b).indices] = 1
    uniform = torch.full((300,), b / 300, dtype=torch.float64)
    best = worst_case_gain(p, gains, k)
    assert best > worst_case_gain(top, gains, k) + 1e-3 and best > worst_case_gain(uniform, gains, k)
    # No random feasible p does better (the LP is the optimum).
    for _ in range(50):
        q = torch.rand(300, generator=gen, dtype=torch.float64) * gains
        q = (q / q.sum() * b).clamp(max=1.0)
        q = q / q.sum() * b
        if q.max() <= 1:
            assert worst_case_gain(q, gains, k) <= best + 1e-7
    # The hardest rows are down-weighted: the largest gain is no longer queried surely.
    assert p[gains.argmax()] < 1


def test_systematic_sampling_includes_rows_with_probability_p():
    from distillery.recipes.active_kd import systematic_sample

    p = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.25, 1.0], dtype=torch.float64)  # sums to 3
    counts = torch.zeros(6)
    for s in range(2000):
        picks = systematic_sample(p, torch.Generator().manual_seed(s))
        assert len(picks) == 3 and len(picks.unique()) == 3
        counts[picks] += 1
    freq = counts / 2000
    assert freq[0] == 1 and freq[5] == 1 and freq[1] == 0
    assert freq[2].item() == pytest.approx(0.5, abs=0.04) and freq[3].item() == pytest.approx(0.25, abs=0.04)


def _teacher(tmp_path):
    from distillery.engine import fit

    cfg = tiny_cfg(tmp_path, name="teacher", student={"arch": "mlp", "kwargs": {"hidden": [64]}}, train={"epochs": 4})
    return fit(cfg).run_dir


def test_recipe_end_to_end_never_sees_pool_labels(tmp_path, monkeypatch):
    import distillery.recipes.self_distillation as sd
    from distillery.data import Split, load_data
    from distillery.recipes.active_kd import run_active_kd

    teacher = _teacher(tmp_path)
    data = load_data(tiny_cfg(tmp_path).data)
    n = len(data.train)
    seen = []
    real = sd._fit_or_reuse
    monkeypatch.setattr(sd, "_fit_or_reuse", lambda cfg, bundle: (seen.append((cfg, bundle)), real(cfg, bundle))[1])

    def run(name, pool, strategy):
        cfg = tiny_cfg(tmp_path, name=name, teacher={"run": str(teacher)},
                       method={"name": "kd", "params": {"temperature": 2.0, "alpha": 0.5}}, train={"epochs": 1})
        return run_active_kd(cfg, rounds=2, per_round=40, strategy=strategy, seed_size=30, data=pool)

    result = run("ak", data, "rad")
    bundles = [b for _, b in seen]
    rows = [b.train.index for b in bundles]
    # The queried set grows by exactly per_round a round, without repeats, nested round to round.
    assert [len(r) for r in rows] == [30, 70, 110] and all(len(r.unique()) == len(r) for r in rows)
    assert all(torch.isin(rows[t], rows[t + 1]).all() for t in range(2))
    assert all(c.method.name == "kd" and c.method.params["alpha"] == 1.0 for c, _ in seen)
    # The labels the engine gets are the teacher's answers, not the pool's.
    from distillery.engine import load_teacher
    from distillery.models import forward_logits

    t_model = load_teacher(seen[-1][0], data)
    with torch.inference_mode():
        t_pred = forward_logits(t_model.eval(), bundles[-1].train.inputs).argmax(1)
    assert torch.equal(bundles[-1].train.labels, t_pred)
    assert [r["queries"] for r in result["rows"]] == [30, 70, 110]
    assert all(0 < r["test_accuracy"] <= 1 for r in result["rows"])
    series = tmp_path / "runs" / "ak"
    assert len(json.loads((series / "rad-s0-queried.json").read_text())) == 2
    assert "| rad | 110 |" in (series / "active_kd.md").read_text()

    # Scramble the labels of every row outside the seed set: selection and training are unchanged.
    seed_rows = bundles[0].train.index
    outside = ~torch.isin(data.train.index, seed_rows)
    labels = data.train.labels.clone()
    labels[outside] = (labels[outside] + 1 + torch.arange(int(outside.sum())) % 5) % data.num_classes
    scrambled = dataclasses.replace(data, train=Split(data.train.inputs, labels, data.train.index))
    seen.clear()
    run("ak-scrambled", scrambled, "rad")
    assert all(torch.equal(a.train.index, b.train.index) and torch.equal(a.train.labels, b.train.labels)
               for a, b in zip(bundles, [b for _, b in seen]))

    # Margin in the same series: round 0 (the seed set) is shared, round 1 queries exactly the
    # candidates of lowest seed-student margin.
    from distillery.recipes.active_kd import _student_probs, student_margin

    seen.clear()
    by_margin = run("ak", data, "margin")
    assert by_margin["rows"][0]["run"] == "seed-s0-r0" == result["rows"][0]["run"]
    assert by_margin["rows"][0]["test_accuracy"] == result["rows"][0]["test_accuracy"]
    pos = torch.arange(n)
    seed_pos = pos[torch.isin(data.train.index, seed_rows)]
    candidates = pos[~torch.isin(pos, seed_pos)]
    margins = student_margin(_student_probs(series / "seed-s0-r0", data, candidates, "cpu", 256))
    picked = json.loads((series / "margin-s0-queried.json").read_text())[0]
    assert sorted(picked) == sorted(candidates[margins.argsort(stable=True)[:40]].tolist())
    summary = {(s["strategy"], s["queries"]) for s in json.loads((series / "active_kd.json").read_text())["summary"]}
    assert {("rad", 110), ("margin", 110), ("rad", 30), ("margin", 30)} <= summary

    # Finished rounds are reused: no training, the same accuracy.
    mtime = (series / "rad-s0-r2" / "model.safetensors").stat().st_mtime
    again = run("ak", data, "rad")
    assert (series / "rad-s0-r2" / "model.safetensors").stat().st_mtime == mtime
    assert again["rows"][-1]["test_accuracy"] == result["rows"][-1]["test_accuracy"]
    # ...but never silently for another budget: the stored rounds must match it.
    cfg = seen[-1][0].model_copy(update={"name": "ak", "output_dir": str(tmp_path / "runs")})
    with pytest.raises(ConfigError, match="another size than per_round=30"):
        run_active_kd(cfg, rounds=1, per_round=30, strategy="rad", seed_size=30, data=data)
    with pytest.raises(ConfigError, match="another seed_size"):
        run_active_kd(cfg, rounds=0, per_round=40, strategy="rad", seed_size=20, data=data)


def test_bad_recipe_input_names_the_problem(tmp_path):
    from distillery.recipes.active_kd import run_active_kd

    with pytest.raises(ConfigError, match="method kd"):
        run_active_kd(tiny_cfg(tmp_path), 1, 10)
    kd = tiny_cfg(tmp_path, method={"name": "kd", "params": {}}, teacher={"run": str(tmp_path)})
    with pytest.raises(ConfigError, match="strategy must be"):
        run_active_kd(kd, 1, 10, strategy="entropy")
    with pytest.raises(ConfigError, match="exceeds"):
        run_active_kd(kd, 100, 50)


def test_cli_active_kd_prints_the_table_and_refuses_bad_seeds(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app

    teacher = _teacher(tmp_path)
    raw = tiny_cfg(tmp_path, name="cli-akd", teacher={"run": str(teacher)},
                   method={"name": "kd", "params": {"temperature": 2.0, "alpha": 1.0}},
                   train={"epochs": 1}).model_dump(mode="json")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["active-kd", str(path), "--rounds", "1", "--per-round", "30", "--seed-size", "30",
                                   "--strategy", "margin"])
    assert res.exit_code == 0, res.output
    assert "active KD (margin)" in res.output
    bad = CliRunner().invoke(app, ["active-kd", str(path), "--seeds", "one"])
    assert bad.exit_code != 0 and "--seeds must be a list of integers" in bad.output and "Traceback" not in bad.output
