"""Competitive distillation (Li et al., 2023, CoMD), text only: instruction cutting, the
assessor's verdicts, ROUGE-L near-duplicate filtering, the judge's scores, the rounds end to end
on tiny GPT-2s (resume, evolution, baseline arm) and an endpoint teacher."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distillery.errors import ConfigError
from distillery.lm import competitive as comp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cut_instructions_takes_one_line_signatures_and_the_lines_after():
    code = ("import os\n"
            "def add(a, b):\n    return a + b\n\n"
            "class K:\n    def m(self) -> int:\n        return 1\n"
            "def long(a,\n         b):\n    pass\n"      # a signature over two lines: skipped
            "def add(a, b):\n    return a + b\n\n"       # duplicate: dropped
            "def tail(x):\n")                            # no room for the lines after it
    assert comp.cut_instructions([code], 2) == ["def add(a, b):\n    return a + b\n",
                                                "    def m(self) -> int:\n        return 1\n"]


def test_student_wins_within_the_margin_and_an_empty_answer_loses():
    s = [-1.0, -1.6, -1.4, float("-inf"), -2.0]
    t = [-1.2, -1.0, -1.0, -5.0, -1.5]
    assert comp.student_wins(s, t, margin=0.5) == [True, False, True, False, True]  # -2.0 >= -1.5 - 0.5: a tie wins
    assert comp.student_wins(s, t, margin=0.0) == [True, False, False, False, False]


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e") = "a c d": P = R = 3/4 -> F1 = 3/4
    assert comp.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    # LCS("a b", "b a c") = 1: P = 1/2, R = 1/3 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert comp.rouge_l("a b", "b a c") == pytest.approx(0.4)
    assert comp.rouge_l("x y", "x y") == 1.0 and comp.rouge_l("", "x") == 0.0 and comp.rouge_l("a", "b") == 0.0


def test_filter_candidates_keeps_valid_new_instructions():
    pool = ["def add(a, b):\n    return a + b\n"]
    candidates = [
        "def add(a, b):\n    return a + b\n    # more\n",        # same as the pool instruction once cut: dropped
        "x = 1\n    return x\n",                                 # not a def: dropped
        "def f(x):\n   \n",                                      # blank body: dropped
        "def f(x):\n",                                           # too short: dropped
        "def scale(v, k):\n    out = [k * e for e in v]\n    return out\n",   # kept, cut to 2 lines
        "def scale(v, k):\n    out = [k * e for e in v]\n",      # duplicate of the kept one: dropped
    ]
    assert comp.filter_candidates(candidates, pool, lines=2, max_similarity=0.7) == [
        "def scale(v, k):\n    out = [k * e for e in v]\n"]
    assert len(comp.filter_candidates(candidates, pool, lines=2, max_similarity=1.0)) == 1  # only exact copies drop at 1.0


def test_judge_scores_are_the_mean_log_likelihood_of_the_answer_given_the_instruction(lm_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_tiny["teacher"])
    model = AutoModelForCausalLM.from_pretrained(lm_tiny["teacher"]).eval()
    instruction, answer = "def add(a, b):\n", "    return a + b"
    got = comp.judge_answers(model, tok, [instruction, instruction], [answer, "   "])
    ctx = tok(instruction, add_special_tokens=False)["input_ids"]
    body = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + body])).logits[0].double(), -1)
    by_hand = sum(float(logp[len(ctx) - 1 + k, tok_id]) for k, tok_id in enumerate(body)) / len(body)
    assert got[0] == pytest.approx(by_hand, abs=1e-4)
    assert got[1] == float("-inf")  # a blank answer never wins


def test_config_errors_name_the_field_and_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {endpoint: {url: 'http://127.0.0.1:9/v1', model: t}}\ntrain: {loss: ce}\n")
    with pytest.raises(ConfigError, match="set judge.path"):
        comp.load_competitive_config(bad)
    with pytest.raises(ConfigError, match="use train.loss: ce"):
        comp.load_competitive_config(bad, ["judge.path=x", "train.loss=forward_kl"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("evolve: {max_simlarity: 0.5}\n")
    with pytest.raises(ConfigError, match=r"evolve.max_simlarity: unknown key; allowed keys here: .*max_similarity"):
        comp.load_competitive_config(typo)
    cfg = comp.load_competitive_config(Path(__file__).resolve().parents[1] / "configs/lm/data/competitive.yaml")
    assert cfg.rounds == 3 and cfg.teacher.path == "runs/lm/teacher"


def _code_file(tmp_path: Path) -> Path:
    """Short functions (tiny models have a 64-token context)."""
    ops = ["+", "-", "*", "//", "%", "**"]
    body = "".join(f"def f{i}(x, y):\n    return x {ops[i % 6]} y + {i}\n\n" for i in range(24))
    path = tmp_path / "code.py"
    path.write_text(body)
    return path


def _cfg(lm_tiny, tmp_path, **over) -> comp.CompetitiveConfig:
    raw = {"name": "comp", "output_dir": str(tmp_path / "runs"),
           "teacher": {"path": str(lm_tiny["teacher"])}, "student": {"path": str(lm_tiny["student"])},
           "instructions": {"source": str(_code_file(tmp_path)), "num_train": 8, "num_eval": 4, "lines": 2},
           "judge": {"margin": 0.5},
           "evolve": {"max_new_tokens": 12, "per_failure": 2, "max_new": 6},
           "train": {"steps_per_round": 3, "batch_size": 4, "block_size": 48},
           "rounds": 2, "max_new_tokens": 8, "eval_text": None, "progress": False}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return comp.CompetitiveConfig.model_validate(raw)


def test_rounds_train_on_lost_instructions_evolve_the_pool_and_resume(lm_tiny, tmp_path, monkeypatch):
    cfg = _cfg(lm_tiny, tmp_path)
    summary = comp.run_competitive(cfg)
    root = tmp_path / "runs" / "comp"
    initial = json.loads((root / "instructions.json").read_text())
    assert len(initial["train"]) == 8 and len(initial["eval"]) == 4 and not set(initial["train"]) & set(initial["eval"])
    pool = initial["train"]
    for r, rec in enumerate(summary["per_round"], start=1):
        judged = comp._read_jsonl(root / f"round-{r}" / "judgments.jsonl")
        assert [j["instruction"] for j in judged] == pool and rec["pool"] == len(pool)
        wins = comp.student_wins([j["student_lp"] for j in judged], [j["teacher_lp"] for j in judged], 0.5)
        assert [j["student_wins"] for j in judged] == wins and rec["lost"] == wins.count(False)
        assert rec["trained_on"] == sum(1 for j in judged if not j["student_wins"] and j["teacher"].strip())
        assert rec["steps"] == (3 if rec["trained_on"] else 0)
        new = json.loads((root / f"round-{r}" / "new_instructions.json").read_text())
        assert len(new) == rec["new_instructions"] <= 6
        for n in new:  # valid and no near-duplicate of the pool it joined
            assert n.startswith("def ") and len(n.splitlines()) == 2
            assert all(comp.rouge_l(n, p) < 0.7 for p in pool)
        pool = pool + new
    assert summary["per_round"][0]["win_rate"] == 0.0  # an untrained student writes noise: it loses
    assert summary["train_steps"] == sum(r["steps"] for r in summary["per_round"])
    evals = comp._read_jsonl(root / "eval_judgments.jsonl")
    assert summary["eval_win_rate"] == pytest.approx(sum(e["student_wins"] for e in evals) / 4)
    assert [e["instruction"] for e in evals] == initial["eval"]
    pairs = [e["teacher_lp"] - e["student_lp"] for e in evals if min(e["teacher_lp"], e["student_lp"]) > -math.inf]
    assert summary["eval_judge_gap"] == (pytest.approx(sum(pairs) / len(pairs)) if pairs else None)

    # a finished run is reused, nothing retrained; another config in the same place is refused
    import distillery.lm.trainer as trainer

    monkeypatch.setattr(trainer, "distill_lm", lambda *a, **k: pytest.fail("retrained a finished round"))
    assert comp.run_competitive(cfg) == summary
    with pytest.raises(ConfigError, match="another config: pass --overwrite"):
        comp.run_competitive(_cfg(lm_tiny, tmp_path, rounds=3))


def test_baseline_arm_trains_once_on_the_whole_pool(lm_tiny, tmp_path):
    cfg = _cfg(lm_tiny, tmp_path, rounds=1, evolve={"enabled": False}, train={"select": "all", "steps_per_round": 6},
               instructions={"num_eval": 0}, eval_text=str(_code_file(tmp_path)), name="base")
    summary = comp.run_competitive(cfg)
    rec = summary["per_round"][0]
    answers = comp._read_jsonl(tmp_path / "runs" / "base" / "teacher_answers.jsonl")
    assert rec["trained_on"] == sum(1 for a in answers if a["answer"].strip()) and rec["new_instructions"] == 0
    assert summary["train_steps"] == 6 and summary["heldout_eval_ppl"] > 1 and "eval_win_rate" not in summary
    run = json.loads((tmp_path / "runs" / "base" / "round-1" / "train" / "summary.json").read_text())
    assert run["steps"] == 6 and run["loss"] == "forward_kl"


def test_a_foreign_directory_is_refused(lm_tiny, tmp_path):
    (tmp_path / "runs" / "comp").mkdir(parents=True)
    (tmp_path / "runs" / "comp" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a competitive-distillation run"):
        comp.run_competitive(_cfg(lm_tiny, tmp_path))


def test_an_endpoint_teacher_writes_the_same_answers(lm_tiny, tmp_path):
    """The teacher behind an OpenAI-compatible stub on 127.0.0.1: its answers are the local
    teacher's greedy answers; the judge and the ce training run from local weights."""
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    local = HFGenerator.from_spec(GeneratorSpec(path=str(lm_tiny["teacher"])))
    with running_server(local) as url:
        cfg = _cfg(lm_tiny, tmp_path, teacher={"path": None, "endpoint": {"url": url, "model": "teacher"}},
                   judge={"path": str(lm_tiny["teacher"])}, train={"loss": "ce"}, rounds=1,
                   instructions={"num_eval": 0})
        summary = comp.run_competitive(cfg)
    answers = comp._read_jsonl(tmp_path / "runs" / "comp" / "teacher_answers.jsonl")
    expected = local.complete([a["instruction"] for a in answers], max_new_tokens=8)
    assert [a["answer"] for a in answers] == [e[0] for e in expected]
    assert summary["per_round"][0]["pool"] == 8 and not math.isnan(summary["per_round"][0]["win_rate"])


def test_zero_rounds_only_evaluates_the_student(lm_tiny, tmp_path):
    cfg = _cfg(lm_tiny, tmp_path, rounds=0, name="ref")
    summary = comp.run_competitive(cfg)
    root = tmp_path / "runs" / "ref"
    assert summary["per_round"] == [] and summary["train_steps"] == 0 and not (root / "round-1").exists()
    evals = comp._read_jsonl(root / "eval_judgments.jsonl")
    assert summary["eval_blank_answers"] == sum(not e["student"].strip() for e in evals)
    assert summary["eval_win_rate"] == sum(e["student_wins"] for e in evals) / len(evals)
