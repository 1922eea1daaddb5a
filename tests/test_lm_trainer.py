"""End-to-end causal-LM distillation on tiny real GPT-2s (transformers) and real text."""
from __future__ import annotations

import json

import pytest
import torch

from lm_helpers import make_model, make_tokenizer, source_glob

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def lm_dirs(lm_tiny):
    return lm_tiny


def raw_cfg(lm_dirs, tmp_path, **over):
    raw = {"name": "run", "output_dir": str(tmp_path / "runs"),
           "teacher": {"path": str(lm_dirs["teacher"])}, "student": {"path": str(lm_dirs["student"])},
           "data": {"source": source_glob(), "block_size": 32, "eval_fraction": 0.25, "max_eval_blocks": 8},
           "loss": {"name": "forward_kl"},
           "train": {"max_steps": 4, "batch_size": 4, "progress": False, "checkpoint_every": 2}}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return raw


def cfg_of(lm_dirs, tmp_path, **over):
    from distillery.lm.config import lm_config_from_dict

    return lm_config_from_dict(raw_cfg(lm_dirs, tmp_path, **over))


def test_distill_exports_a_loadable_student_and_leaves_the_teacher_alone(lm_dirs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distillery.lm.trainer import distill_lm

    before = load_file(str(lm_dirs["teacher"] / "model.safetensors"))
    student0 = load_file(str(lm_dirs["student"] / "model.safetensors"))
    result = distill_lm(cfg_of(lm_dirs, tmp_path, train={"max_steps": 6}))
    s = result.summary
    assert s["steps"] == 6 and s["student_params"] < s["teacher_params"]
    assert s["eval_ppl"] > 1 and 0 <= s["agreement"] <= 1 and s["eval_kl"] >= 0
    assert s["teacher_ppl"] > 1
    after = load_file(str(lm_dirs["teacher"] / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(result.run_dir / "student")
    trained = load_file(str(result.run_dir / "student" / "model.safetensors"))
    assert any(not torch.equal(trained[k], student0[k]) for k in student0)  # it learned something
    assert model.config.n_layer == 1
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and "eval_ppl" in rows[-1]
    assert (result.run_dir / "curves.png").stat().st_size > 1000


def _one_batch(lm_dirs, tmp_path, **over):
    from distillery.lm import data as lmdata
    from distillery.lm import models as lmmodels
    from distillery.lm.trainer import _Objective, _teacher_outputs

    cfg = cfg_of(lm_dirs, tmp_path, **over)
    tok = lmmodels.load_tokenizer(cfg.student)
    teacher = lmmodels.load_model(cfg.teacher, "teacher").eval()
    student = lmmodels.load_model(cfg.student, "student")
    rows = lmdata.load_splits(cfg.data, tok).train
    batch = lmdata.collate([rows[i] for i in range(3)], tok.pad_token_id)
    return _Objective(student, cfg, len(tok), None), batch, _teacher_outputs(teacher, batch, cfg)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "taid"])
def test_fused_lm_head_gives_the_unfused_loss_and_gradients(lm_dirs, tmp_path, loss):
    """The student's logits computed chunk by chunk inside the loss (never for the whole batch)
    give the same value and the same gradients as the loss on full logits."""
    extra = {"t": 0.6} if loss == "taid" else {}
    values, grads = [], []
    for fused in (True, False):
        objective, batch, teacher_out = _one_batch(lm_dirs, tmp_path, loss={"name": loss, "fused": fused,
                                                                            "chunk_size": 7, "ce_weight": 0.3})
        value = sum(objective(batch, teacher_out, extra).values())
        value.backward()
        values.append(value.detach())
        grads.append(torch.cat([p.grad.flatten() for p in objective.student.parameters()]))
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_interrupted_run_resumes_to_the_same_weights(lm_dirs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distillery.lm.trainer import distill_lm

    whole = distill_lm(cfg_of(lm_dirs, tmp_path, name="whole", train={"max_steps": 4, "checkpoint_every": 2}))
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    cfg = cfg_of(lm_dirs, tmp_path, name="broken", train={"max_steps": 4, "checkpoint_every": 2})
    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill_lm(cfg)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = distill_lm(cfg, resume=True)
    a = load_file(str(whole.run_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_batches_score_only_generated_tokens(lm_dirs):
    from transformers import AutoModelForCausalLM

    from distillery.lm.data import IGNORE
    from distillery.lm.generate import generate_batch

    model = AutoModelForCausalLM.from_pretrained(lm_dirs["student"])
    prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12])]
    out = generate_batch(model, prompts, max_new_tokens=6, pad_id=0, eos_id=None, do_sample=True)
    assert out["input_ids"].shape == (2, 10)
    assert torch.equal(out["input_ids"][:, :4], torch.stack(prompts))
    # position t predicts token t+1: positions 3..8 predict the 6 generated tokens
    assert (out["targets"][:, :3] == IGNORE).all() and (out["targets"][:, 9] == IGNORE).all()
    assert torch.equal(out["targets"][:, 3:9], out["input_ids"][:, 4:10])
    # an EOS ends the scored part: everything after it is masked and not attended
    eos = int(out["input_ids"][0, 6])
    again = generate_batch(model, prompts[:1], max_new_tokens=6, pad_id=0, eos_id=eos, do_sample=False)
    seq = again["input_ids"][0]
    first = 4 + int((seq[4:] == eos).nonzero()[0]) if (seq[4:] == eos).any() else seq.numel()
    assert (again["targets"][0, first:] == IGNORE).all()
    assert again["attention_mask"][0, first + 1:].sum() == 0


def test_gkd_and_seqkd_runs(lm_dirs, tmp_path):
    from distillery.lm.trainer import distill_lm

    gkd = distill_lm(cfg_of(lm_dirs, tmp_path, name="gkd", loss={"name": "jsd", "params": {"beta": 0.5}},
                            onpolicy={"lmbda": 1.0, "max_new_tokens": 8, "prompt_length": 8}))
    assert gkd.summary["onpolicy_lambda"] == 1.0 and gkd.summary["steps"] == 4
    seq = distill_lm(cfg_of(lm_dirs, tmp_path, name="seqkd", loss={"name": "ce"},
                            seqkd={"enabled": True, "max_new_tokens": 8, "prompt_length": 8, "batch_size": 32}))
    from datasets import load_from_disk

    corpus = load_from_disk(str(seq.run_dir / "seqkd-corpus"))
    row = corpus[0]
    assert row["prompt_len"] == 8 and all(t == -100 for t in row["targets"][:7])
    assert 1 <= sum(t != -100 for t in row["targets"]) <= 8


def test_taid_t_rises_and_is_logged(lm_dirs, tmp_path):
    from distillery.lm.trainer import distill_lm

    r = distill_lm(cfg_of(lm_dirs, tmp_path, loss={"name": "taid", "taid": {"t_start": 0.2, "t_end": 1.0}},
                          train={"max_steps": 10}))
    rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    ts = [row["taid_t"] for row in rows if "taid_t" in row]
    assert ts and ts[-1] >= 0.2 + 0.8 * 10 / 10 - 1e-9  # the linear lower bound reaches t_end


def test_lora_student_trains_adapters_only_and_exports_merged(lm_dirs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distillery.lm.trainer import distill_lm

    r = distill_lm(cfg_of(lm_dirs, tmp_path, student={"lora": {"r": 4, "target_modules": ["c_attn"]}},
                          train={"lr": 1e-2}))
    merged = load_file(str(r.run_dir / "student" / "model.safetensors"))
    base = load_file(str(lm_dirs["student"] / "model.safetensors"))
    assert set(merged) == set(base)  # plain GPT-2 keys: the adapters are merged
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("c_attn.weight" in k for k in changed)
    AutoModelForCausalLM.from_pretrained(r.run_dir / "student")


def test_uld_distils_across_tokenizers(lm_dirs, tmp_path):
    from distillery.lm.trainer import distill_lm

    other = make_tokenizer(tmp_path / "tok2", vocab_size=360)
    teacher = make_model(tmp_path / "teacher2", other, n_layer=1, n_embd=32)
    r = distill_lm(cfg_of(lm_dirs, tmp_path, teacher={"path": str(teacher)}, loss={"name": "uld", "ce_weight": 1.0},
                          train={"max_steps": 2}))
    assert r.summary["steps"] == 2 and r.summary["eval_ppl"] > 1


def test_distillation_from_the_cache_with_any_loss_and_stale_caches_refused(lm_dirs, tmp_path):
    from distillery.lm.cache import LMCacheError
    from distillery.lm.trainer import build_cache, distill_lm

    cache_dir = str(tmp_path / "store")
    topk = cfg_of(lm_dirs, tmp_path, name="cached-jsd", loss={"name": "jsd", "params": {"beta": 0.5}},
                  cache={"scheme": "topk", "k": 8, "dir": cache_dir})
    store = build_cache(topk)
    assert store.k == 8 and len(store) > 0 and store.bytes_per_token > 0
    built = (tmp_path / "store" / "manifest.json").stat().st_mtime_ns
    r = distill_lm(topk)
    assert r.summary["cache"]["k"] == 8 and r.summary["steps"] == 4
    assert (tmp_path / "store" / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt
    # the same store serves another loss of the same teacher and data
    distill_lm(cfg_of(lm_dirs, tmp_path, name="cached-rkl", loss={"name": "reverse_kl"},
                      cache={"scheme": "topk", "k": 8, "dir": cache_dir}))
    # a store built for another teacher is refused before training, naming what differs
    other = make_model(tmp_path / "other-teacher", lm_dirs["tok"], n_layer=2, n_embd=48, n_positions=64, seed=5)
    with pytest.raises(LMCacheError, match="teacher"):
        distill_lm(cfg_of(lm_dirs, tmp_path, name="stale", teacher={"path": str(other)},
                          cache={"scheme": "topk", "k": 8, "dir": cache_dir}))
    # sampled tokens with importance weights (forward KL)
    s = distill_lm(cfg_of(lm_dirs, tmp_path, name="sampled", cache={"scheme": "sample", "k": 8,
                                                                    "dir": str(tmp_path / "sampled-store")}))
    assert s.summary["cache"]["bytes_per_token"] > 0


def test_hidden_state_distillation_trains_the_projection(lm_dirs, tmp_path):
    from distillery.lm.trainer import distill_lm

    r = distill_lm(cfg_of(lm_dirs, tmp_path, name="hidden", hidden={"weight": 0.5, "loss": "mse"}))
    assert r.summary["steps"] == 4
    ckpt = sorted((r.run_dir / "checkpoints").glob("step-*"))[-1]
    from safetensors.torch import load_file

    keys = load_file(str(ckpt / "trainable.safetensors")).keys()
    assert any(k.startswith("layer_map.") for k in keys)  # the projections are trained and checkpointed
    assert not any(k.startswith("layer_map.") for k in load_file(str(r.run_dir / "student" / "model.safetensors")))
    from distillery.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden.mapping"):
        distill_lm(cfg_of(lm_dirs, tmp_path, name="badmap", hidden={"mapping": [[5, 1]]}))


def test_recipe_chains_stages_and_resumes_at_the_unfinished_one(lm_dirs, tmp_path):
    import yaml

    from distillery.errors import ConfigError
    from distillery.lm.recipe import load_recipe, run_recipe, stage_configs

    base = raw_cfg(lm_dirs, tmp_path)
    base["train"]["max_steps"] = 2
    recipe = {"base": base, "stages": [
        {"name": "latent", "loss": {"weight": 0.0}, "hidden": {"weight": 1.0}},
        {"name": "soft", "student": {"path": "{stage:latent}"}, "loss": {"name": "forward_kl", "ce_weight": 1.0}},
    ]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfgs = stage_configs(*load_recipe(path))
    assert cfgs[1].student.path == str(tmp_path / "runs" / "latent" / "student")
    out = run_recipe(path)
    assert list(out) == ["latent", "soft"] and all(s["steps"] == 2 for s in out.values())
    again = run_recipe(path)  # finished stages are reused, not retrained
    assert again["soft"]["wall_seconds"] == out["soft"]["wall_seconds"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": base, "stages": [{"name": "a", "student": {"path": "{stage:b}"}}]}))
    with pytest.raises(ConfigError, match="not an earlier stage"):
        stage_configs(*load_recipe(bad))
