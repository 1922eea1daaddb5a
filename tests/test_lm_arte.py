"""ARTE (Liu et al., 2024): pairs, in-context scores, one DPO step, the endpoint teacher, resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def row(pid, did, score, text=None):
    return {"prompt_id": pid, "draft_id": did, "prompt": f"def f{pid}():\n", "score": score,
            "continuation": text if text is not None else f"    return {pid}{did}\n"}


def test_pairs_are_best_vs_worst_per_prompt_and_ties_are_dropped():
    from distillery.lm.arte import preference_pairs

    rows = [row(0, 0, 0.1), row(0, 1, 0.5), row(0, 2, -0.2),      # best 1, worst 2
            row(1, 0, 0.3), row(1, 1, 0.3),                       # tie: dropped
            row(2, 0, 0.2, "x"), row(2, 1, 0.9, "x"),             # same text: no preference
            row(3, 0, -1.0), row(3, 1, -0.96)]                    # margin 0.04
    pairs = preference_pairs(rows)
    assert [p["prompt_id"] for p in pairs] == [0, 3]
    p0 = pairs[0]
    assert (p0["chosen"], p0["rejected"]) == ("    return 01\n", "    return 02\n")
    assert (p0["chosen_score"], p0["rejected_score"]) == (0.5, -0.2) and p0["prompt"] == "def f0():\n"
    assert [p["prompt_id"] for p in preference_pairs(rows, min_margin=0.05)] == [0]  # 0.04 <= 0.05 is a tie


def test_seed_prompts_keep_validation_files_apart_and_prompts_distinct():
    import re

    from distillery.errors import DataError
    from distillery.lm.arte import ARTEPrompts, seed_prompts

    docs = [f"def a{d}(x):\n    return x\n\ndef shared():\n    return {d}\nclass C{d}:\n    y = 1\n" for d in range(6)]
    p = ARTEPrompts(align=3, train=4, probe=1, validation=2, validation_chars=30)
    out = seed_prompts(docs, p, seed=0)
    assert len(out["validation"]) == 2 and all(len(v) <= 30 for v in out["validation"])
    held = {re.search(r"\d", v).group(0) for v in out["validation"]}
    assert len(held) == 2  # two different files
    prompts = out["align"] + out["train"] + out["probe"]
    assert len(prompts) == len(set(prompts)) == 8 and all(q.endswith(":\n") for q in prompts)
    assert "def shared():\n" in prompts  # one line shared by every file is one prompt
    assert not any(d in q for q in prompts for d in held)  # no prompt from a validation file
    assert seed_prompts(docs, p, seed=0) == out and seed_prompts(docs, p, seed=1) != out
    with pytest.raises(DataError, match="lower prompts.align/train/probe"):
        seed_prompts(docs, ARTEPrompts(align=30, train=4, probe=1, validation=2), seed=0)


def test_in_context_score_is_the_mean_per_token_gain_over_the_validation_set(lm_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.errors import DataError
    from distillery.lm.arte import in_context_scores
    from distillery.lm.scoring import score_texts

    tok = AutoTokenizer.from_pretrained(lm_tiny["student"])
    model = AutoModelForCausalLM.from_pretrained(lm_tiny["student"]).eval()
    drafts = ["def add(a, b):\n    return a + b", "class A:\n    pass"]
    validation = ["def sub(a, b):\n    return a - b", "import os\nx = os.sep", "for i in range(3):\n    print(i)"]
    got = in_context_scores(model, tok, drafts, validation, separator="\n\n", batch_size=2)
    alone = score_texts(model, tok, validation).per_token
    for i, d in enumerate(drafts):
        helped = score_texts(model, tok, validation, [d + "\n\n"] * 3).per_token
        assert got[i] == pytest.approx(float((helped - alone).mean()), abs=1e-5)
    # one term by hand: log p(v | d) from a plain forward pass over the concatenated ids
    ctx = tok(drafts[0] + "\n\n")["input_ids"]
    body = tok(validation[0])["input_ids"]
    ids = torch.tensor([ctx + body])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    by_hand = sum(float(lp[len(ctx) - 1 + t, body[t]]) for t in range(len(body))) / len(body)
    assert score_texts(model, tok, validation[:1], [drafts[0] + "\n\n"]).per_token[0] == pytest.approx(by_hand, abs=1e-4)
    for draft in ("x = 1\n" * 25, "x = 1\n" * 12):  # the draft alone, or draft + snippet, exceeds 64 tokens
        assert len(tok(draft)["input_ids"]) + len(tok(validation[2])["input_ids"]) > 64
        with pytest.raises(DataError, match="longer than the student's context: lower drafts.max_new_tokens"):
            in_context_scores(model, tok, [draft], validation)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8.0}], ids=["full", "lora"])
def test_one_dpo_step_raises_the_chosen_over_rejected_log_ratio(lm_tiny, tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.lm.arte import ARTEDPO, dpo_align, dpo_reward_margins
    from distillery.lm.scoring import score_texts
    from distillery.lm.textgen import GeneratorSpec

    pairs = [{"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "    pass\n"}]
    dpo = ARTEDPO(beta=0.1, lr=1e-2, steps=1, batch_size=1, lora=lora)
    log = dpo_align(GeneratorSpec(path=str(lm_tiny["teacher"])), pairs, dpo, tmp_path / "aligned")
    assert log["train_loss"][0] == pytest.approx(math.log(2), abs=1e-4)  # -log sigmoid(0): policy == reference
    tok = AutoTokenizer.from_pretrained(lm_tiny["teacher"])
    before = AutoModelForCausalLM.from_pretrained(lm_tiny["teacher"]).eval()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned").eval()

    def ratio(model):
        lp = score_texts(model, tok, [pairs[0]["chosen"], pairs[0]["rejected"]], [pairs[0]["prompt"]] * 2).logprob
        return float(lp[0] - lp[1])

    assert ratio(after) > ratio(before) + 1e-4
    assert set(after.state_dict()) == set(before.state_dict())  # a LoRA adapter is merged: a plain GPT-2 again
    # the implicit reward margin is beta x the change of that log-ratio, 0 for the reference itself
    assert log["reward_margin_mean"] == pytest.approx(0.1 * (ratio(after) - ratio(before)), rel=1e-3)
    assert float(dpo_reward_margins(before, before, tok, pairs, 0.1)[0]) == 0.0
    assert not (tmp_path / "aligned.tmp").exists() and (tmp_path / "aligned" / "tokenizer_config.json").is_file()


def test_drafts_from_an_endpoint_teacher_equal_the_local_ones(lm_tiny):
    from distillery.lm.arte import write_drafts
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import Endpoint, GeneratorSpec, HFGenerator, load_generator

    local = HFGenerator.from_spec(GeneratorSpec(path=str(lm_tiny["teacher"])))
    prompts = ["def add(a, b):\n", "class Point:\n", "def main():\n"]
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=0.95, seed=3, chunk=2)
    expected = write_drafts(local, prompts, **kw)
    with running_server(local) as url:
        remote = load_generator(GeneratorSpec(endpoint=Endpoint(url=url, model="teacher")))
        got = write_drafts(remote, prompts, **kw)
    assert got == expected and len(got) == 6
    assert [(r["prompt_id"], r["draft_id"]) for r in got] == [(i, j) for i in range(3) for j in range(2)]
    assert got[0]["continuation"] != got[1]["continuation"]  # sampled drafts differ


def test_bad_configs_give_one_clear_message(tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.arte import ARTEConfig, dpo_align, load_arte_config, run_arte
    from distillery.lm.textgen import GeneratorSpec

    path = tmp_path / "arte.yaml"
    path.write_text("name: x\ndpo: {beta: 0.1, epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"dpo.epochs: unknown key; allowed keys here: batch_size, beta, lora, lr, steps"):
        load_arte_config(path)
    path.write_text("prompts: {pattern: '^(def'}\n")
    with pytest.raises(ConfigError, match="prompts.pattern is not a regular expression"):
        load_arte_config(path)
    with pytest.raises(ConfigError, match="drafts.per_prompt: Input should be greater than or equal to 2"):
        load_arte_config(path, ["prompts.pattern=^def", "drafts.per_prompt=1"])
    with pytest.raises(ConfigError, match="set data.eval_fraction > 0 or data.eval_source"):
        load_arte_config(path, ["prompts.pattern=^def", "data.source=stdlib:*.py", "data.eval_fraction=0"])
    endpoint = {"endpoint": {"url": "http://127.0.0.1:9/v1", "model": "t"}}
    cfg = ARTEConfig.model_validate({"teacher": endpoint, "output_dir": str(tmp_path / "runs")})
    for call in (lambda: run_arte(cfg), lambda: dpo_align(GeneratorSpec(**endpoint), [], cfg.dpo, tmp_path / "a")):
        with pytest.raises(ConfigError, match="needs the teacher's weights .* give `path`, not an `endpoint`"):
            call()
    assert not (tmp_path / "runs").exists()  # refused before writing anything


@pytest.fixture
def tiny_arte(lm_tiny, tmp_path):
    from distillery.lm.arte import ARTEConfig

    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(10):
        body = "".join(f"def f{d}_{j}(x):\n    return x * {j} + {d}\n\n\nclass K{d}{j}:\n    n = {j}\n\n\n" for j in range(3))
        (docs / f"m{d}.py").write_text(body)
    return ARTEConfig.model_validate({
        "name": "arte", "output_dir": str(tmp_path / "runs"), "progress": False,
        "teacher": {"path": str(lm_tiny["teacher"])},
        "student": {"path": str(lm_tiny["student"]), "pretrain_steps": 2, "steps": 2, "batch_size": 2},
        "data": {"source": str(docs), "block_size": 32, "eval_fraction": 0.2, "max_eval_blocks": 4},
        "prompts": {"align": 3, "train": 6, "probe": 2, "validation": 2, "validation_chars": 40},
        "drafts": {"per_prompt": 2, "max_new_tokens": 8}, "dpo": {"steps": 1, "batch_size": 2}})


def test_end_to_end_on_tiny_models_then_resume_skips_every_stage(tiny_arte, monkeypatch):
    from distillery.errors import RunDirExistsError
    from distillery.lm import arte, trainer

    summary = arte.run_arte(tiny_arte)
    run_dir = tiny_arte.output_dir + "/arte"
    files = {p.name for p in Path(run_dir).iterdir()}
    assert {"arte.yaml", "prompts.json", "drafts.jsonl", "scores.jsonl", "pairs.jsonl", "aligned-teacher", "probe-original.jsonl",
            "probe-aligned.jsonl", "corpus-original.jsonl", "corpus-aligned.jsonl", "student-base", "student-original",
            "student-aligned", "summary.json"} <= files
    scores = [json.loads(x) for x in open(run_dir + "/scores.jsonl")]
    pairs = [json.loads(x) for x in open(run_dir + "/pairs.jsonl")]
    assert len(scores) == 3 * 2 and pairs == arte.preference_pairs(scores)
    assert summary["pairs"] == len(pairs) and summary["ties_dropped"] == 3 - len(pairs)
    assert len(open(run_dir + "/corpus-aligned.jsonl").readlines()) == 6 == summary["corpora"]["original"]["examples"]
    assert set(summary["student_eval_ppl"]) == {"base", "original", "aligned"}
    assert all(1 < v < 1e6 for v in summary["student_eval_ppl"].values())
    assert summary["dpo"]["reward_margin_mean"] > 0 and 0 <= summary["probe"]["aligned_wins"] <= 1
    assert json.loads(open(run_dir + "/student-aligned/summary.json").read())["steps"] == 2

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    for name in ("write_drafts", "in_context_scores", "dpo_align"):
        monkeypatch.setattr(arte, name, boom)
    monkeypatch.setattr(trainer, "distill_lm", boom)
    assert arte.run_arte(tiny_arte.model_copy(update={"progress": True})) == summary  # progress is not part of the run
    with pytest.raises(RunDirExistsError, match="holds an ARTE run with another config"):
        arte.run_arte(tiny_arte.model_copy(update={"seed": 1}))
    foreign = tiny_arte.model_copy(update={"name": "other"})
    (Path(tiny_arte.output_dir) / "other").mkdir()
    (Path(tiny_arte.output_dir) / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirExistsError, match="not an ARTE run directory"):
        arte.run_arte(foreign, overwrite=True)
