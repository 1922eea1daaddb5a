"""Text for causal-LM distillation, read and tokenised through Hugging Face ``datasets``.

Every example becomes ``input_ids`` (T,) and ``targets`` (T,) *aligned with the logits*: the
logit at position t is scored against ``targets[t] = input_ids[t + 1]``; positions that must not
be learned (prompt tokens, the last position, padding) hold -100 -- the convention of
``distillery.losses.lm``.  ``prompt_len`` keeps where the prompt ends, for on-policy generation.

* ``format: text``: documents + EOS are concatenated and cut into blocks of ``block_size``
  (the usual ``group_texts`` packing); nothing is masked but the last position.
* ``format: prompt_response``: prompt (optionally wrapped in the tokenizer's chat template) +
  response + EOS, truncated to ``block_size``; the prompt's positions are masked.
* ``format: chat``: a list of ``{role, content}`` messages; everything before the last
  assistant message is the prompt.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery.errors import ConfigError, DataError
from distillery.lm.config import LMData

IGNORE = -100
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}


def resolve_source(source: str) -> str:
    """``stdlib:PATTERN`` names files of this interpreter's standard library (portable configs
    for the offline demo), e.g. ``stdlib:*.py``; anything else is returned as it is."""
    if source.startswith("stdlib:"):
        import sysconfig

        return os.path.join(sysconfig.get_paths()["stdlib"], source[len("stdlib:"):])
    return source


def _files(source: str) -> list[str] | None:
    """The local files a source names (a file, a directory, a glob), or None for a Hub id."""
    source = resolve_source(source)
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in set(_BUILDERS) | _TEXT_SUFFIXES)
        if not found:
            raise DataError(f"data directory {source} has no .jsonl/.json/.parquet/.csv/.txt/.py/.md files")
        return found
    if any(ch in source for ch in "*?["):
        found = sorted(glob.glob(source, recursive=True))
        if not found:
            raise DataError(f"no file matches data.source {source!r}: check the pattern")
        return found
    if source.startswith((".", "/", "~")) or source.endswith(tuple(_BUILDERS) + tuple(_TEXT_SUFFIXES)):
        raise DataError(f"data file not found: {source}")
    return None


def load_documents(source: str, cfg: LMData):
    """A ``datasets.Dataset`` of raw rows from local files or the Hub."""
    from datasets import load_dataset

    files = _files(source)
    if files is None:  # a Hub dataset id
        try:
            return load_dataset(source, cfg.hub_config, split=cfg.split)
        except Exception as err:  # noqa: BLE001 -- datasets raises many types; one message for all
            raise DataError(f"cannot load the Hub dataset {source!r} (split {cfg.split!r}): {err}") from None
    kinds = {_BUILDERS.get(Path(f).suffix, "text") for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.source {source!r} mixes file kinds {sorted(kinds)}: point it at one kind")
    kind = kinds.pop()
    extra = {"sample_by": "document"} if kind == "text" else {}
    try:
        return load_dataset(kind, data_files=files, split="train", **extra)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read {source!r} as {kind}: {err}") from None


def _require_columns(ds, columns: list[str], cfg: LMData) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"data.format {cfg.format!r} needs column(s) {missing}; the data has {ds.column_names}. "
                        "Set data.text_column / prompt_column / response_column / messages_column")


def _use_template(tok, cfg: LMData) -> bool:
    has = bool(getattr(tok, "chat_template", None))
    if cfg.chat_template == "always" and not has:
        raise ConfigError("data.chat_template: always, but the tokenizer has no chat template: set it to never or auto")
    return has and cfg.chat_template != "never"


def _prompt_text(tok, messages: list[dict], template: bool) -> str:
    if template:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(m["content"] + "\n" for m in messages)


def _pairs(batch: dict, cfg: LMData, tok, template: bool) -> tuple[list[str], list[str]]:
    if cfg.format == "prompt_response":
        # Without a template the prompt is used as written (its own separator, if any).
        prompts = [_prompt_text(tok, [{"role": "user", "content": p}], True) if template else p
                   for p in batch[cfg.prompt_column]]
        return prompts, list(batch[cfg.response_column])
    prompts, responses = [], []
    for messages in batch[cfg.messages_column]:
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError("data.format chat: each example's last message must be the assistant's answer "
                            f"(role 'assistant'); got {messages[-1] if messages else 'no messages'}")
        prompts.append(_prompt_text(tok, messages[:-1], template))
        responses.append(messages[-1]["content"])
    return prompts, responses


def tokenize(ds, tok, cfg: LMData):
    """Raw rows -> {input_ids, targets, prompt_len} rows (``datasets`` map, cached on disk)."""
    eos = tok.eos_token_id
    block = cfg.block_size
    if cfg.format == "text":
        _require_columns(ds, [cfg.text_column], cfg)

        def pack(batch):
            ids: list[int] = []
            for text in batch[cfg.text_column]:
                if text:
                    ids.extend(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
                    if eos is not None:
                        ids.append(eos)
            n = len(ids) // block
            blocks = [ids[i * block:(i + 1) * block] for i in range(n)]
            return {"input_ids": blocks, "targets": [b[1:] + [IGNORE] for b in blocks], "prompt_len": [0] * n}

        return ds.map(pack, batched=True, batch_size=256, remove_columns=ds.column_names, desc="tokenising + packing")

    if cfg.format == "pairs":
        return _tokenize_pairs(ds, tok, cfg)
    _require_columns(ds, [cfg.prompt_column, cfg.response_column] if cfg.format == "prompt_response"
                     else [cfg.messages_column], cfg)
    template = _use_template(tok, cfg)

    def encode(batch):
        out = {"input_ids": [], "targets": [], "prompt_len": []}
        for prompt, response in zip(*_pairs(batch, cfg, tok, template)):
            p = tok(prompt, add_special_tokens=not template)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if len(p) >= block - 1:  # no room for a single response token: not learnable
                continue
            ids = (p + r)[:block]
            # targets[t] = ids[t+1] only where ids[t+1] is a response token
            targets = [ids[t + 1] if t + 1 >= len(p) else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
            out["input_ids"].append(ids)
            out["targets"].append(targets)
            out["prompt_len"].append(len(p))
        return out

    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names, desc="tokenising")


def _encode_pair(p: list[int], r: list[int], block: int) -> tuple[list[int], list[int]]:
    ids = (p + r)[:block]
    return ids, [ids[t + 1] if t + 1 >= len(p) else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def _tokenize_pairs(ds, tok, cfg: LMData):
    """prompt + chosen and prompt + rejected (each + EOS), prompt masked: REDI's training pairs."""
    _require_columns(ds, [cfg.prompt_column, cfg.chosen_column, cfg.rejected_column], cfg)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    def encode(batch):
        out = {"input_ids": [], "targets": [], "prompt_len": [], "rejected_ids": [], "rejected_targets": []}
        for prompt, chosen, rejected in zip(batch[cfg.prompt_column], batch[cfg.chosen_column], batch[cfg.rejected_column]):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            if len(p) >= cfg.block_size - 1:
                continue
            c_ids, c_t = _encode_pair(p, tok(chosen, add_special_tokens=False)["input_ids"] + eos, cfg.block_size)
            r_ids, r_t = _encode_pair(p, tok(rejected, add_special_tokens=False)["input_ids"] + eos, cfg.block_size)
            out["input_ids"].append(c_ids)
            out["targets"].append(c_t)
            out["prompt_len"].append(len(p))
            out["rejected_ids"].append(r_ids)
            out["rejected_targets"].append(r_t)
        return out

    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names, desc="tokenising pairs")


@dataclass
class LMSplits:
    train: object  # datasets.Dataset with torch format
    eval: object
    n_documents: int


def load_splits(cfg: LMData, tok) -> LMSplits:
    docs = load_documents(cfg.source, cfg)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    if len(docs) == 0:
        raise DataError(f"data.source {cfg.source!r} has no rows")
    if cfg.eval_source is not None:
        train_docs, eval_docs = docs, load_documents(cfg.eval_source, cfg)
    elif cfg.eval_fraction > 0 and len(docs) > 1:
        n_eval = max(1, round(cfg.eval_fraction * len(docs)))
        split = docs.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
    else:
        train_docs, eval_docs = docs, None
    train = tokenize(train_docs, tok, cfg)
    if len(train) == 0:
        raise DataError(f"no training sequence left after tokenising {cfg.source!r}: the text is shorter than one "
                        f"block of {cfg.block_size} tokens, or every prompt fills the block. Lower data.block_size "
                        "or add data")
    evaluation = tokenize(eval_docs, tok, cfg) if eval_docs is not None else None
    if evaluation is not None and len(evaluation) > cfg.max_eval_blocks:
        evaluation = evaluation.select(range(cfg.max_eval_blocks))
    cols = ["input_ids", "targets", "prompt_len"] + (["rejected_ids", "rejected_targets"] if cfg.format == "pairs" else [])
    return LMSplits(train.with_format("torch", columns=cols),
                    None if evaluation is None or len(evaluation) == 0 else evaluation.with_format("torch", columns=cols),
                    len(docs))


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: padding gets ``pad_id``, attention 0 and target -100.

    Pair rows (``rejected_ids``): the batch holds the B chosen sequences, then the B rejected
    ones (2B rows), and ``pairs`` = B."""
    if "rejected_ids" in rows[0]:
        rejected = [{"input_ids": r["rejected_ids"], "targets": r["rejected_targets"], "prompt_len": r["prompt_len"]}
                    for r in rows]
        chosen = [{k: r[k] for k in ("input_ids", "targets", "prompt_len")} for r in rows]
        out = collate(chosen + rejected, pad_id)
        out["pairs"] = torch.tensor(len(rows))
        if "index" in rows[0]:
            out["index"] = torch.as_tensor([int(r["index"]) for r in rows])
        return out
    length = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    targets = torch.full((n, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        input_ids[i, :k] = torch.as_tensor(r["input_ids"])
        targets[i, :k] = torch.as_tensor(r["targets"])
        mask[i, :k] = 1
    out = {"input_ids": input_ids, "targets": targets, "attention_mask": mask,
           "prompt_len": torch.as_tensor([int(r["prompt_len"]) for r in rows])}
    if "index" in rows[0]:
        out["index"] = torch.as_tensor([int(r["index"]) for r in rows])
    return out


class Indexed(torch.utils.data.Dataset):
    """Adds each row's position, the key of the teacher cache."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "index": i}
