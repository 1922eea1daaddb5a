"""PGKD (Di Palo et al., 2024): hard-example selection, early stopping, targeted requests, the
endpoint teacher and the active loop end to end on tiny models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(),
                                 reason="WordNet not installed (apt-get install wordnet-base)")]

CATS = ["noun.animal", "noun.plant", "noun.food"]


def test_select_hard_takes_confidently_wrong_then_lowest_margin():
    from distillery.lm.pgkd import select_hard

    probs = np.array([[0.9, 0.05, 0.05],   # 0: right, margin 0.85
                      [0.2, 0.7, 0.1],     # 1: wrong (true 0, says 1), margin -0.5
                      [0.4, 0.35, 0.25],   # 2: right, margin 0.05
                      [0.1, 0.45, 0.45],   # 3: wrong-ish (true 0), margin -0.35, tie 1/2 -> first
                      [0.05, 0.15, 0.8],   # 4: true 1, says 2, margin -0.65
                      [0.3, 0.2, 0.5]])    # 5: right (true 2), margin 0.2
    labels = np.array([0, 0, 0, 0, 1, 2])
    assert select_hard(probs, labels, 3) == [(4, 2), (1, 1), (3, 1)]
    assert select_hard(probs, labels, 5) == [(4, 2), (1, 1), (3, 1), (2, 1), (5, 0)]
    assert len(select_hard(probs, labels, 100)) == 6


def test_early_stopping_patience_and_best_round():
    from distillery.lm.pgkd import EarlyStopping

    stop = EarlyStopping(patience=2)
    assert [stop.update(v) for v in (0.5, 0.6, 0.6, 0.7, 0.65, 0.7)] == [False, False, False, False, False, True]
    assert stop.best == 0.7 and stop.best_round == 3
    stop = EarlyStopping(patience=1, min_delta=0.05)
    assert [stop.update(v) for v in (0.5, 0.54)] == [False, True]  # +0.04 is not an improvement
    assert stop.best_round == 0


def test_targeted_requests_pair_true_and_confused_class():
    from distillery.lm.pgkd import PGKDConfig, targeted_requests

    cfg = PGKDConfig(task={"categories": CATS}, n_true=2, n_contrast=1, prefix_words=2)
    val = [("a large wild cat", 0), ("an edible fruit of a tree", 2)]
    classes, prefixes = targeted_requests([(1, 1), (0, 2)], val, cfg)
    assert classes == [2, 2, 1, 0, 0, 2]
    assert prefixes == ["an edible"] * 3 + ["a large"] * 3


def _cfg(lm_tiny, tmp_path, teacher: dict, **over):
    from distillery.lm.pgkd import PGKDConfig

    raw = dict(name="pg", output_dir=str(tmp_path / "runs"), teacher=teacher,
               task={"categories": CATS, "n_test": 12, "n_val": 6, "n_pool": 16, "max_words": 12},
               teacher_build={"init": str(lm_tiny["teacher"]), "steps": 3, "batch_size": 4, "block_size": 48},
               shots=1, n_initial=2, max_rounds=3, patience=1, hard_per_round=2, n_true=1, n_contrast=1,
               seeds=[0, 1], max_new_tokens=8, progress=False)
    raw.update(over)
    return PGKDConfig.model_validate(raw)


def test_active_loop_end_to_end_matches_its_rules_and_resumes(lm_tiny, tmp_path):
    from distillery.lm import glossgen as gg
    from distillery.lm.pgkd import EarlyStopping, run_pgkd, select_hard

    teacher = tmp_path / "wn-teacher"
    cfg = _cfg(lm_tiny, tmp_path, {"path": str(teacher)}, patience=2)
    s = run_pgkd(cfg)
    run_dir = tmp_path / "runs" / "pg"
    assert (teacher / "config.json").is_file() and (run_dir / "val_accuracy.png").stat().st_size > 1000
    assert s["new_per_round"] == 4
    splits = gg.gloss_splits(cfg.task)
    val_texts, val_labels = [t for t, _ in splits["val"]], np.array([k for _, k in splits["val"]])
    for strategy in ("pgkd", "random"):
        info = s["strategies"][strategy]
        for seed, curve in zip((0, 1), info["val_curves"]):
            rows = gg.read_jsonl(run_dir / f"rounds-{strategy}-seed{seed}.jsonl")
            assert [r["val_acc"] for r in rows] == curve
            stop = EarlyStopping(2)  # the run stopped exactly where the rule says
            ends = [stop.update(v) or i == cfg.max_rounds for i, v in enumerate(curve)]
            assert ends.index(True) == len(curve) - 1
            assert all(r["n_train"] + len(r["added"]) == nxt["n_train"] for r, nxt in zip(rows, rows[1:]))
            assert all(len(r["added"]) <= 4 for r in rows) and rows[-1]["added"] == []
            if strategy == "pgkd" and len(rows) > 1:
                # round 0's targets are the lowest-margin validation examples of round 0's student
                data = gg.few_shot(splits["pool"], 1, 3, seed) + \
                    [(r["text"], r["label"]) for r in gg.read_jsonl(run_dir / f"initial-seed{seed}.jsonl")]
                probs = gg.Student(3, seed=seed).fit(data).proba(val_texts)
                hard = select_hard(probs, val_labels, 2)
                assert rows[0]["confusions"] == [[int(val_labels[i]), c] for i, c in hard]
                assert rows[0]["n_train"] == len(data)
        best = [max(range(len(c)), key=lambda i: (c[i], -i)) for c in info["val_curves"]]
        tests = [info["test_curves"][k][b] for k, b in enumerate(best)]
        assert info["test_acc_at_best_val"][0] == pytest.approx(float(np.mean(tests)))
    # teacher labels: the generative classifier's argmax
    added = [a for r in gg.read_jsonl(run_dir / "rounds-pgkd-seed0.jsonl") for a in r["added"]]
    if added:
        from distillery.lm.textgen import GeneratorSpec, HFGenerator

        gen = HFGenerator.from_spec(GeneratorSpec(path=str(teacher)))
        clf = gg.GenerativeClassifier(gen.model, gen.tokenizer, CATS)
        assert clf.predict([a["text"] for a in added]).tolist() == [a["label"] for a in added]
    # resume: a finished run is replayed from its logs, not regenerated
    log = run_dir / "rounds-random-seed1.jsonl"
    before = log.stat().st_mtime_ns
    assert run_pgkd(cfg)["strategies"] == s["strategies"]
    assert log.stat().st_mtime_ns == before
    # an interrupted run (the last round's log line lost) continues to the same result
    rows = gg.read_jsonl(log)
    if len(rows) > 1:
        gg.write_jsonl(log, rows[:-1])
        again = run_pgkd(cfg)["strategies"]["random"]
        assert again["val_curves"] == s["strategies"]["random"]["val_curves"]


def test_endpoint_teacher_generates_and_labels_by_prompt(lm_tiny, tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm import glossgen as gg
    from distillery.lm.pgkd import run_pgkd
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    gen = HFGenerator.from_spec(GeneratorSpec(path=str(lm_tiny["teacher"])))
    with running_server(gen) as url:
        endpoint = {"endpoint": {"url": url, "model": "teacher"}}
        with pytest.raises(ConfigError, match="teacher.path"):
            run_pgkd(_cfg(lm_tiny, tmp_path, endpoint, name="pg-endpoint-teacher"))
        s = run_pgkd(_cfg(lm_tiny, tmp_path, endpoint, label_with="prompt", seeds=[0], strategies=["pgkd"]))
    rows = gg.read_jsonl(tmp_path / "runs" / "pg" / "rounds-pgkd-seed0.jsonl")
    added = [a for r in rows for a in r["added"]]
    assert all(a["label"] == a["asked"] for a in added)
    assert s["strategies"]["pgkd"]["teacher_kept_asked_label"] in (None, 1.0)
    # targeted requests continue the hard example's opening words
    if len(rows) > 1 and rows[0]["added"]:
        splits = gg.gloss_splits(_cfg(lm_tiny, tmp_path, endpoint).task)
        openings = {" ".join(t.split()[:3]) for t, _ in splits["val"]}
        assert all(" ".join(a["text"].split()[:3]) in openings for a in rows[0]["added"])


def test_bad_config_gives_one_clear_message(tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.pgkd import load_pgkd_config

    path = tmp_path / "pg.yaml"
    path.write_text("task: {categories: [noun.animal, noun.animals]}\n")
    with pytest.raises(ConfigError) as err:
        load_pgkd_config(path)
    assert "noun.animals" in str(err.value) and "valid names" in str(err.value) and "noun.food" in str(err.value)
    with pytest.raises(ConfigError, match="n_true"):
        load_pgkd_config(path, ["task.categories=[noun.animal,noun.food]", "n_true=0", "n_contrast=0"])
    with pytest.raises(ConfigError, match="strategies"):
        load_pgkd_config(path, ["task.categories=[noun.animal,noun.food]", "strategies=[smart]"])


def test_ready_config_runs_on_the_demo_paths():
    from distillery.lm.pgkd import load_pgkd_config

    ready = Path(__file__).resolve().parents[1] / "configs/lm/data/pgkd.yaml"
    cfg = load_pgkd_config(ready, ["patience=3"])
    assert cfg.teacher.path == "runs/lm/wordnet-teacher" and cfg.strategies == ["pgkd", "random"]
    assert cfg.patience == 3 and cfg.label_with == "teacher"
