"""REDI (Xu et al., 2025): the objective against hand computations and gradients, the verifier,
pairing, the endpoint teacher, and a tiny end-to-end run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the objective --------------------------------------------------------------------------------

def test_sequence_logprobs_sum_only_the_trace_tokens():
    from distillery.losses.redi import sequence_logprobs

    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[-100, 1, 2]])  # position 0 is the prompt
    lp, n = sequence_logprobs(logits, targets)
    assert n.tolist() == [2]
    assert lp.item() == pytest.approx(math.log(0.8) + math.log(0.6), abs=1e-6)


def test_redi_loss_matches_the_formula_by_hand():
    from distillery.losses.redi import redi_loss

    # pair 1: |y+| = 4, log π(y+) = -2; |y-| = 2, log π(y-) = -3; pair 2: -1 over 1, -8 over 4
    pos, pos_n = torch.tensor([-2.0, -1.0]), torch.tensor([4, 1])
    neg, neg_n = torch.tensor([-3.0, -8.0]), torch.tensor([2, 4])
    alpha = 0.8
    by_hand = ((2 / 4 + alpha * (-3 / 2)) + (1 / 1 + alpha * (-8 / 4))) / 2
    assert redi_loss(pos, pos_n, neg, neg_n, alpha=alpha).item() == pytest.approx(by_hand)


def test_alpha_zero_is_sft_on_the_positives_and_the_negative_gradient_is_alpha_scaled():
    from distillery.losses.redi import redi_loss_from_logits, sequence_logprobs

    torch.manual_seed(0)
    pos_logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    neg_logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    pos_t = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6], [-100, 0, 0, -100, -100]])
    neg_t = torch.tensor([[-100, 2, -100, -100, -100], [-100, 1, 1, 1, 1], [-100, -100, 6, 5, -100]])
    sft = sequence_logprobs(pos_logits, pos_t)
    expected = -(sft[0] / sft[1]).mean()
    got = redi_loss_from_logits(pos_logits, pos_t, neg_logits, neg_t, alpha=0.0)
    assert got.item() == pytest.approx(expected.item())
    # dL/d(neg logits) = alpha x d(mean length-normalised log π(y-))/d(neg logits)
    g_half = torch.autograd.grad(redi_loss_from_logits(pos_logits, pos_t, neg_logits, neg_t, alpha=0.5), neg_logits)[0]
    g_one = torch.autograd.grad(redi_loss_from_logits(pos_logits, pos_t, neg_logits, neg_t, alpha=1.0), neg_logits)[0]
    assert torch.allclose(g_half, 0.5 * g_one)
    assert torch.autograd.gradcheck(
        lambda p, n: redi_loss_from_logits(p, pos_t, n, neg_t, alpha=0.8), (pos_logits, neg_logits))


def test_redi_loss_rejects_bad_input_with_one_message():
    from distillery.losses.redi import redi_loss

    one = torch.tensor([-1.0])
    with pytest.raises(ValueError, match="alpha >= 0"):
        redi_loss(one, torch.tensor([1]), one, torch.tensor([1]), alpha=-0.1)
    with pytest.raises(ValueError, match="pairs"):
        redi_loss(one, torch.tensor([1]), torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="empty traces"):
        redi_loss(one, torch.tensor([0]), one, torch.tensor([1]))


# ---- task, verifier, pairs, config ----------------------------------------------------------------

def test_addition_traces_are_correct_and_the_verifier_parses_them():
    from distillery.lm.redi import addition_trace, final_answer, problems

    prompt, trace = addition_trace(472, 389)
    assert prompt == "4 7 2 + 3 8 9 ="
    assert trace == " 2+9+0=11 ; 7+8+1=16 ; 4+3+1=8 ; ans 8 6 1"
    assert final_answer(trace) == 861
    assert final_answer(addition_trace(999, 1)[1]) == 1000
    assert final_answer(" 2+9+0=11 ; 7+8+1=16") is None  # no answer: wrong, never crashes
    held = problems(50, 2, seed=1)
    train = problems(200, 2, seed=0, exclude=set(held))
    assert len(set(train)) == 200 and not set(train) & set(held)


def test_pairs_take_one_positive_and_one_negative_of_the_same_problem():
    from distillery.lm.redi import make_pairs

    rows = [{"prompt": "p1", "response": "a", "correct": True}, {"prompt": "p1", "response": "b", "correct": False},
            {"prompt": "p1", "response": "c", "correct": False}, {"prompt": "p2", "response": "d", "correct": True},
            {"prompt": "p3", "response": "e", "correct": False}]
    pairs = make_pairs(rows, per_problem=5, seed=0)
    assert sorted(pairs) == [("p1", "a", "b"), ("p1", "a", "c")]  # p2 has no negative, p3 no positive
    assert len(make_pairs(rows, per_problem=1, seed=0)) == 1


def test_config_errors_name_the_field(tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.redi import load_redi_config

    bad = tmp_path / "redi.yaml"
    bad.write_text("redi: {alpha: -1}\n")
    with pytest.raises(ConfigError, match="redi.alpha"):
        load_redi_config(bad)
    bad.write_text("sampling: {temprature: 1}\n")
    with pytest.raises(ConfigError, match="allowed keys here"):
        load_redi_config(bad)
    ready = Path(__file__).resolve().parents[1] / "configs/lm/data/redi.yaml"
    cfg = load_redi_config(ready, ["redi.alpha=0.5"])
    assert cfg.redi.alpha == 0.5 and cfg.teacher.path == "runs/lm/redi-teacher"


# ---- the teacher through an endpoint, and a run end to end ----------------------------------------

def _tiny_cfg(lm_tiny, tmp_path, **over):
    from distillery.lm.redi import redi_config_from_dict

    raw = {"name": "run", "output_dir": str(tmp_path / "runs"), "teacher": {"path": str(lm_tiny["teacher"])},
           "teacher_build": None,
           "student": {"tokenizer": str(lm_tiny["tok"]), "shape": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
           "task": {"digits": 1, "train_problems": 12, "eval_problems": 6},
           "sampling": {"samples_per_problem": 3, "max_new_tokens": 12},
           "sft": {"steps": 3, "batch_size": 4}, "redi": {"steps": 3, "batch_size": 2, "checkpoint_every": 2},
           "progress": False}
    raw.update(over)
    return redi_config_from_dict(raw)


def test_traces_come_from_an_endpoint_teacher_as_from_the_local_one(lm_tiny, tmp_path):
    from distillery.lm.redi import sample_traces
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    local = _tiny_cfg(lm_tiny, tmp_path, sampling={"samples_per_problem": 2, "max_new_tokens": 8, "temperature": 1e-4})
    want = sample_traces(local, tmp_path / "local.jsonl")
    with running_server(HFGenerator.from_spec(GeneratorSpec(path=str(lm_tiny["teacher"])))) as url:
        remote = local.model_copy(update={"teacher": GeneratorSpec(endpoint={"url": url, "model": "teacher"})})
        got = sample_traces(remote, tmp_path / "remote.jsonl")
    assert len(got) == len(want) == 24
    # near-greedy sampling: the same text whichever way the teacher is reached
    assert [r["response"] for r in got] == [r["response"] for r in want]
    assert all(set(r) >= {"prompt", "response", "correct"} for r in got)


def test_run_redi_end_to_end_and_resume_reuses_the_stages(lm_tiny, tmp_path, monkeypatch):
    from distillery.errors import RunDirExistsError
    from distillery.lm import redi as redi_mod

    # a teacher that writes one right and two wrong traces per problem: REDI has pairs to learn from
    def fake_sample(cfg, path):
        rows = []
        for a, b in redi_mod._splits(cfg)[0]:
            prompt, right = redi_mod.addition_trace(a, b)
            rows += [{"prompt": prompt, "response": right, "correct": True},
                     {"prompt": prompt, "response": right[:-1] + "0", "correct": right.endswith(" 0")},
                     {"prompt": prompt, "response": " ans 1 2 3", "correct": a + b == 123}]
        return rows

    monkeypatch.setattr(redi_mod, "sample_traces", fake_sample)
    cfg = _tiny_cfg(lm_tiny, tmp_path)
    summary = redi_mod.run_redi(cfg)
    run_dir = tmp_path / "runs" / "run"
    assert summary["sft"]["steps"] == 3 and summary["redi"]["steps"] == 3
    assert 0 <= summary["accuracy"] <= 1 and summary["redi"]["pairs"] >= 12
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "redi" / "student").config.n_layer == 1
    assert redi_mod.run_redi(cfg) == summary  # finished: read back, not retrained
    with pytest.raises(RunDirExistsError, match="another config"):
        redi_mod.run_redi(cfg.model_copy(update={"seed": 1}))
    (tmp_path / "runs" / "foreign").mkdir()
    (tmp_path / "runs" / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(RunDirExistsError, match="not a REDI run"):
        redi_mod.run_redi(cfg.model_copy(update={"name": "foreign"}), overwrite=True)


def test_an_interrupted_redi_stage_resumes_to_the_same_weights(lm_tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distillery.lm.redi import redi_stage

    cfg = _tiny_cfg(lm_tiny, tmp_path, redi={"steps": 4, "batch_size": 2, "checkpoint_every": 2})
    pairs = [("1 + 2 =", " ans 3", " ans 4"), ("2 + 2 =", " ans 4", " ans 5"), ("3 + 4 =", " ans 7", " ans 1")]
    straight, _ = redi_stage(cfg, lm_tiny["student"], pairs, tmp_path / "straight")
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        redi_stage(cfg, lm_tiny["student"], pairs, tmp_path / "resumed")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed, summary = redi_stage(cfg, lm_tiny["student"], pairs, tmp_path / "resumed")
    assert summary["steps"] == 4
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_lm_pairs_format_computes_the_redi_objective(lm_tiny, tmp_path):
    """data.format: pairs + loss.name: redi in distill_lm: the batch holds B chosen then B rejected
    rows, prompt masked, and the loss is redi_loss of the model's own sequence log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.errors import ConfigError
    from distillery.lm import data as lmdata
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import _Objective
    from distillery.losses.redi import redi_loss_from_logits

    rows = [{"prompt": "1 + 2 =", "chosen": " ans 3", "rejected": " ans 4"},
            {"prompt": "20 + 2 =", "chosen": " ans 22", "rejected": " ans 5 5"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"name": "p", "output_dir": str(tmp_path / "runs"), "student": {"path": str(lm_tiny["student"])},
           "data": {"source": str(path), "format": "pairs", "block_size": 32, "eval_fraction": 0.0},
           "loss": {"name": "redi", "params": {"alpha": 0.5}}, "train": {"max_steps": 1, "batch_size": 2}}
    cfg = lm_config_from_dict(raw)
    tok = AutoTokenizer.from_pretrained(lm_tiny["student"])
    ds = lmdata.load_splits(cfg.data, tok).train
    batch = lmdata.collate([ds[0], ds[1]], tok.pad_token_id)
    assert int(batch["pairs"]) == 2 and batch["input_ids"].shape[0] == 4
    for i, r in enumerate(rows):  # prompt masked, the response (+ EOS) scored, in both halves
        p = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        for j, key in ((i, "chosen"), (i + 2, "rejected")):
            resp = tok(r[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            scored = batch["targets"][j][batch["targets"][j] != -100].tolist()
            assert scored == resp and (batch["targets"][j][: p - 1] == -100).all()
    model = AutoModelForCausalLM.from_pretrained(lm_tiny["student"]).eval()
    terms = _Objective(model, cfg, len(tok), None, tok)(batch, {}, {})
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = redi_loss_from_logits(logits[:2], batch["targets"][:2], logits[2:], batch["targets"][2:], alpha=0.5)
    assert float(terms["redi"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    with pytest.raises(ConfigError, match="go together"):
        lm_config_from_dict({**raw, "loss": {"name": "ce"}})
    with pytest.raises(ConfigError, match="not parameters of 'redi'"):
        _Objective(model, lm_config_from_dict({**raw, "loss": {"name": "redi", "params": {"beta": 1}}}), len(tok), None, tok)
