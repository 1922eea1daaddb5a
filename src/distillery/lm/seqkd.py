"""Sequence-level knowledge distillation: the student learns from text the teacher wrote.

Kim & Rush (2016), "Sequence-Level Knowledge Distillation": instead of (or besides) matching the
teacher's per-token distributions, train the student on the teacher's own outputs -- the
(approximate) mode of its sequence distribution, found with beam search (``seqkd.num_beams``;
1 = greedy).  Every training prompt (the prompt of a prompt/response example, or the first
``seqkd.prompt_length`` tokens of a packed text block) is continued by the teacher once, before
training; the corpus is saved in the run directory (atomically) so a resumed run reuses it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


from distillery.engine.progress import ProgressBar
from distillery.errors import DataError
from distillery.lm import data as lmdata
from distillery.lm.generate import generate_batch, prompts_of


def teacher_corpus(teacher, train, tokenizer, cfg, run_dir: Path, device=None):
    """A ``datasets.Dataset`` (torch format) of prompt + teacher continuation, prompt masked."""
    from datasets import Dataset, load_from_disk

    final = run_dir / "seqkd-corpus"
    if (final / "dataset_info.json").is_file():
        return load_from_disk(str(final)).with_format("torch", columns=["input_ids", "targets", "prompt_len"])
    sk = cfg.seqkd
    rows = {"input_ids": [], "targets": [], "prompt_len": []}
    n = len(train)
    with ProgressBar(n, enabled=cfg.train.progress, title="teacher writes (seq-KD)") as bar:
        for start in range(0, n, sk.batch_size):
            batch = lmdata.collate([train[i] for i in range(start, min(n, start + sk.batch_size))],
                                   tokenizer.pad_token_id)
            out = generate_batch(teacher, prompts_of(batch, sk.prompt_length), max_new_tokens=sk.max_new_tokens,
                                 pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, do_sample=False,
                                 num_beams=sk.num_beams, device=device)
            for ids, targets, attn, p in zip(out["input_ids"], out["targets"], out["attention_mask"], out["prompt_len"]):
                k = int(attn.sum())
                if (targets[:k] != lmdata.IGNORE).any():
                    rows["input_ids"].append(ids[:k].tolist())
                    rows["targets"].append(targets[:k].tolist())
                    rows["prompt_len"].append(int(p))
            bar.step(loss=float("nan"), samples=len(out["input_ids"]), advance=len(out["input_ids"]))
    if not rows["input_ids"]:
        raise DataError("the teacher wrote no scored token for any prompt (it ends every prompt with EOS at once): "
                        "check the teacher, or lower seqkd.prompt_length")
    tmp = run_dir / "seqkd-corpus.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_dict(rows).save_to_disk(str(tmp))
    os.replace(tmp, final)
    return load_from_disk(str(final)).with_format("torch", columns=["input_ids", "targets", "prompt_len"])
