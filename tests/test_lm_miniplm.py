"""MiniPLM (Gu et al., 2024): difference sampling -- documents, selection rule, scores, a tiny end-to-end run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lm_helpers import STDLIB

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_chunk_source_cuts_top_level_blocks_keeps_decorators_and_drops_short_pieces():
    from distillery.lm.miniplm import chunk_source

    text = "\n".join([
        '"""doc"""', "import os", "import sys", "X = 1",                      # preamble: 4 non-blank lines
        "@decorator", "def f(a):", "    b = a", "    return b",               # one block with its decorator
        "class C:", "    pass",                                               # 2 lines: dropped
        "def g():", *[f"    x{i} = {i}" for i in range(9)],                   # 10 lines, cut 6 + 4
    ])
    docs = chunk_source(text, max_lines=6, min_lines=3)
    assert docs == ['"""doc"""\nimport os\nimport sys\nX = 1\n',
                    "@decorator\ndef f(a):\n    b = a\n    return b\n",
                    "def g():\n" + "".join(f"    x{i} = {i}\n" for i in range(5)),
                    "".join(f"    x{i} = {i}\n" for i in range(5, 9))]


def test_top_alpha_keeps_exactly_the_highest_scores_ties_to_the_earlier_document():
    from distillery.errors import DataError
    from distillery.lm.miniplm import random_subset, top_alpha

    scores = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, 0.0, -0.2, 0.3, 1.0, -3.0])
    assert top_alpha(scores, 0.5) == [0, 2, 3, 4, 8]        # 5.0, 2.0, 1.0, then the first two 0.3s of three
    assert top_alpha(scores, 0.25) == [2, 4]                # floor(2.5) = 2 documents
    assert top_alpha(scores, 0.99) == sorted(set(range(10)) - {9})
    with pytest.raises(DataError, match="keeps none"):
        top_alpha(scores, 0.05)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        top_alpha(scores, 1.0)
    a, b = random_subset(10, 5, seed=0), random_subset(10, 5, seed=1)
    assert len(a) == len(set(a)) == 5 and all(0 <= i < 10 for i in a) and a != b
    assert random_subset(10, 5, seed=0) == a


def test_difference_score_is_the_per_token_log_ratio_and_arms_have_the_same_size():
    from distillery.lm.miniplm import difference_scores, select

    teacher = torch.tensor([-10.0, -40.0, -6.0, -30.0])
    reference = torch.tensor([-20.0, -40.0, -3.0, -60.0])
    tokens = torch.tensor([5, 10, 6, 20])
    r = difference_scores(teacher, reference, tokens)
    assert torch.allclose(r, torch.tensor([2.0, 0.0, -0.5, 1.5]))
    scores = {"teacher": teacher, "reference": reference, "tokens": tokens}
    assert select("difference", scores, 0.5, 0) == [0, 3]
    # the teacher alone prefers what is easy for everyone (document 2: -1 nat/token, but -0.5 for the reference)
    assert select("teacher", scores, 0.5, 0) == [2, 3]
    assert len(select("random", scores, 0.5, 7)) == 2


def test_scores_equal_score_texts_and_a_hand_computed_log_likelihood(lm_tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.lm.miniplm import MiniPLMConfig, score_pool
    from distillery.lm.scoring import score_texts

    docs = ["def add(a, b):\n    return a + b\n", "import json\nx = json.loads('[1]')\n", "class A:\n    pass\n"]
    cfg = MiniPLMConfig(teacher={"path": str(lm_tiny["teacher"])}, reference={"path": str(lm_tiny["student"])},
                        score_max_tokens=64, progress=False)
    got = score_pool(cfg, docs, str(lm_tiny["student"]), tmp_path)
    tok = AutoTokenizer.from_pretrained(lm_tiny["tok"])
    for role, path in (("teacher", lm_tiny["teacher"]), ("reference", lm_tiny["student"])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        expect = score_texts(model, tok, docs, max_length=64)
        assert torch.allclose(got[role], expect.logprob, atol=1e-4)
        assert torch.equal(got["tokens"], expect.tokens)
        # by hand, document 0: log p(x_1..x_n | EOS) = sum_t log softmax(logits_t)[x_{t+1}]
        ids = [tok.eos_token_id] + tok(docs[0])["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        by_hand = sum(float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        assert math.isclose(float(got[role][0]), by_hand, abs_tol=1e-3)
    assert (tmp_path / "scores.json").is_file()
    # r is the per-token difference of exactly these numbers
    from distillery.lm.miniplm import difference_scores

    r = difference_scores(got["teacher"], got["reference"], got["tokens"])
    assert torch.allclose(r, (got["teacher"] - got["reference"]) / got["tokens"])


def test_bad_config_and_an_endpoint_teacher_give_one_clear_message(lm_tiny, tmp_path):
    from distillery.errors import ConfigError, DataError, RunDirExistsError
    from distillery.lm.miniplm import MiniPLMConfig, load_miniplm_config, run_miniplm

    path = tmp_path / "m.yaml"
    path.write_text("reference: {path: a, train: {steps: 3}}\n")
    with pytest.raises(ConfigError, match="exactly one of `path`.*or `train"):
        load_miniplm_config(path)
    with pytest.raises(ConfigError, match=r"alpha: .*less than 1"):
        load_miniplm_config(path, ["reference.train=null", "alpha=1.5"])
    endpoint = MiniPLMConfig(teacher={"endpoint": {"url": "http://127.0.0.1:9/v1", "model": "t"}},
                             output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="needs the teacher's weights"):
        run_miniplm(endpoint)
    cfg = MiniPLMConfig(teacher={"path": str(lm_tiny["teacher"])}, output_dir=str(tmp_path), name="x",
                        pool={"source": str(tmp_path / "nothing" / "*.py")})
    with pytest.raises(DataError, match="no file matches"):
        run_miniplm(cfg)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(RunDirExistsError, match="not a MiniPLM run directory"):
        run_miniplm(cfg.model_copy(update={"name": "foreign"}), overwrite=True)
    assert (tmp_path / "foreign" / "keep.txt").is_file()


def test_end_to_end_on_tiny_models_selects_trains_and_resumes(lm_tiny, tmp_path, monkeypatch):
    from distillery.lm import trainer
    from distillery.lm.miniplm import MiniPLMConfig, difference_scores, read_jsonl, run_miniplm, top_alpha

    train = {"max_steps": 3, "batch_size": 4, "progress": False, "checkpoint_every": 0, "warmup_steps": 0}
    cfg = MiniPLMConfig(
        output_dir=str(tmp_path), name="m", teacher={"path": str(lm_tiny["teacher"])},
        reference={"train": {"init": str(lm_tiny["student"]), "fraction": 0.3, "steps": 2, "batch_size": 4}},
        pool={"source": f"{STDLIB}/json/*.py", "max_lines": 12, "min_lines": 3, "eval_fraction": 0.2,
              "max_documents": 40, "max_eval_documents": 10},
        alpha=0.3, score_max_tokens=64, arms=["difference", "random"],
        student={"path": str(lm_tiny["student"]), "init": "random"}, seeds=[0, 1], block_size=32, train=train,
        progress=False)
    s = run_miniplm(cfg)
    run = tmp_path / "m"
    pool, held = read_jsonl(run / "pool.jsonl"), read_jsonl(run / "eval.jsonl")
    assert len(pool) == s["pool_documents"] == 40 and not set(pool) & set(held)
    raw = json.loads((run / "scores.json").read_text())
    r = difference_scores(torch.tensor(raw["teacher"]), torch.tensor(raw["reference"]), torch.tensor(raw["tokens"]))
    chosen = read_jsonl(run / "selected" / "difference.jsonl")
    assert chosen == [pool[i] for i in top_alpha(r, 0.3)] and len(chosen) == 12
    for seed in (0, 1):
        rand = read_jsonl(run / "selected" / f"random-s{seed}.jsonl")
        assert len(rand) == 12 and set(rand) <= set(pool)
    assert s["selections"]["difference"]["mean_r"] >= max(v["mean_r"] for v in s["selections"].values())
    assert (run / "reference" / "student" / "config.json").is_file()
    for arm in ("difference", "random"):
        runs = s["students"][arm]["runs"]
        assert [x["seed"] for x in runs] == [0, 1] and all(x["steps"] == 3 and x["eval_ppl"] > 1 for x in runs)
        assert s["students"][arm]["eval_ppl"]["mean"] == pytest.approx(sum(x["eval_ppl"] for x in runs) / 2)
    # every stage is on disk: a second call trains and scores nothing
    monkeypatch.setattr(trainer, "distill_lm", lambda *a, **k: pytest.fail("retrained a finished stage"))
    assert run_miniplm(cfg)["students"] == s["students"]
