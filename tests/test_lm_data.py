"""LM data (datasets), and the checks that stop a bad run before its first step."""
from __future__ import annotations

import json

import pytest

from lm_helpers import make_tokenizer, source_glob


@pytest.fixture
def dirs(lm_tiny):
    return {**lm_tiny, "model": lm_tiny["student"]}


def tokenizer(dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs["tok"])


def data_cfg(**kw):
    from distillery.lm.config import LMData

    return LMData(**{"source": source_glob(), "block_size": 32, **kw})


def test_text_is_packed_into_blocks_with_targets_shifted_by_one(dirs):
    from distillery.lm.data import IGNORE, load_splits

    tok = tokenizer(dirs)
    splits = load_splits(data_cfg(eval_fraction=0.25), tok)
    row = splits.train[0]
    assert row["input_ids"].shape == (32,) and row["prompt_len"] == 0
    assert row["targets"][:-1].tolist() == row["input_ids"][1:].tolist() and row["targets"][-1] == IGNORE
    assert len(splits.eval) > 0
    # held-out documents are not in the training blocks
    train_text = {tuple(r["input_ids"].tolist()) for r in splits.train}
    assert not any(tuple(r["input_ids"].tolist()) in train_text for r in splits.eval)


def test_prompt_tokens_are_masked(dirs, tmp_path):
    from distillery.lm.data import IGNORE, load_splits

    tok = tokenizer(dirs)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x):", "response": f" return x + {i}"})
                              for i in range(8)))
    splits = load_splits(data_cfg(source=str(path), format="prompt_response", eval_fraction=0), tok)
    row = splits.train[0]
    n_prompt = len(tok("def f0(x):")["input_ids"])
    assert row["prompt_len"] == n_prompt
    targets = row["targets"].tolist()
    assert all(t == IGNORE for t in targets[: n_prompt - 1])
    response = tok(" return x + 0", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert targets[n_prompt - 1:-1] == response  # exactly the response (+EOS) is learned


def test_chat_messages_use_the_tokenizer_template(dirs, tmp_path):
    from distillery.lm.data import IGNORE, load_splits

    tok = tokenizer(dirs)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "import os"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    row = load_splits(data_cfg(source=str(path), format="chat", eval_fraction=0), tok).train[0]
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<user>hi<assistant>"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert row["prompt_len"] == n_prompt and (row["targets"][: n_prompt - 1] == IGNORE).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": msgs[:1]}) + "\n")
    from distillery.errors import DataError

    with pytest.raises(DataError, match="last message must be the assistant"):
        load_splits(data_cfg(source=str(bad), format="chat", eval_fraction=0), tok)


@pytest.mark.parametrize("source, message", [("/nope/data.jsonl", "not found"), ("/nope/*.jsonl", "no file matches")])
def test_missing_data_is_named(dirs, source, message):
    from distillery.errors import DataError
    from distillery.lm.data import load_splits

    with pytest.raises(DataError, match=message):
        load_splits(data_cfg(source=source), tokenizer(dirs))


def test_empty_dataset_and_missing_columns_stop_with_a_fix(dirs, tmp_path):
    from distillery.errors import DataError
    from distillery.lm.data import load_splits

    tok = tokenizer(dirs)
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(DataError, match="no training sequence left.*block_size"):
        load_splits(data_cfg(source=str(short), eval_fraction=0), tok)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError, match=r"needs column\(s\) \['prompt', 'response'\].*prompt_column"):
        load_splits(data_cfg(source=str(pairs), format="prompt_response", eval_fraction=0), tok)


def test_vocabulary_pad_and_context_checks(dirs, tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm import models as M
    from distillery.lm.config import LMModel

    tok = tokenizer(dirs)
    other_dir = make_tokenizer(tmp_path / "other", vocab_size=350)
    other = M.load_tokenizer(LMModel(path=str(other_dir)))
    model = M.load_model(LMModel(path=str(dirs["model"])), "student")
    with pytest.raises(ConfigError, match="tokenizers differ.*loss.name: uld"):
        M.check_pair(model, other, model, tok, "forward_kl")
    assert M.check_pair(model, tok, model, tok, "forward_kl").same
    with pytest.raises(ConfigError, match=r"exceed the student's context of 64 tokens: set data.block_size <= 64"):
        M.check_context({"student": model}, 65)
    with pytest.raises(ConfigError, match="<= 32"):
        M.check_context({"student": model}, 40, extra=32)
    nopad = make_tokenizer(tmp_path / "nopad", pad=False)
    with pytest.raises(ConfigError, match="no pad token: set data.pad_token"):
        M.load_tokenizer(LMModel(path=str(nopad)))
    assert M.load_tokenizer(LMModel(path=str(nopad)), pad_token="<|endoftext|>").pad_token == "<|endoftext|>"
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        M.load_tokenizer(LMModel(path=str(nopad)), pad_token="<nope>")
    from distillery.errors import ModelError

    with pytest.raises(ModelError, match="cannot load the teacher causal LM from /nope"):
        M.load_model(LMModel(path="/nope"), "teacher")


@pytest.mark.parametrize("raw, message", [
    ({"loss": {"name": "forward_kl"}}, "need a `teacher:` section"),
    ({"teacher": {"path": "t"}, "loss": {"name": "jsd"}, "cache": {"k": 8, "scheme": "sample"}}, "cache.scheme: topk"),
    ({"teacher": {"path": "t"}, "loss": {"name": "ce"}, "cache": {"k": 8}}, "remove the `cache:` section"),
    ({"teacher": {"path": "t"}, "cache": {"k": 8}, "onpolicy": {"lmbda": 0.5}}, "onpolicy.lmbda: 0"),
    ({"student": {"path": "s", "init": "random", "lora": {"r": 4}}, "loss": {"name": "ce"}}, "use init: pretrained"),
    ({"loss": {"name": "kl"}}, "loss.name"),
    ({"train": {"max_step": 3}}, "unknown key"),
])
def test_config_errors_name_the_field(raw, message):
    from distillery.errors import ConfigError
    from distillery.lm.config import lm_config_from_dict

    base = {"student": {"path": "s"}, "data": {"source": "x.txt"}}
    with pytest.raises(ConfigError, match=message):
        lm_config_from_dict({**base, **raw})


def test_cli_reports_bad_input_in_one_line(dirs, tmp_path):
    from typer.testing import CliRunner

    from distillery.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"student: {{path: {dirs['model']}}}\ndata: {{source: /nope/*.txt, block_size: 32}}\nloss: {{name: ce}}\n"
                   f"output_dir: {tmp_path}\ntrain: {{progress: false}}\n")
    res = CliRunner().invoke(app, ["lm", "distill", str(cfg)])
    assert res.exit_code == 2 and "no file matches" in res.output and "Traceback" not in res.output
