"""Tiny real causal LMs for the LM tests: a byte-level BPE trained on a few standard-library
files, GPT-2 teacher and student built from ``transformers`` configs (random weights)."""
from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

STDLIB = sysconfig.get_paths()["stdlib"]
FILES = [os.path.join(STDLIB, f) for f in ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
                                            "textwrap.py", "shlex.py", "fnmatch.py", "glob.py")]


def make_tokenizer(out: Path, files=FILES, vocab_size: int = 300, pad: bool = True) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(list(files), vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    extra = {"pad_token": "<|endoftext|>"} if pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", **extra)
    tok.save_pretrained(out)
    return out


def make_model(out: Path, tokenizer_dir: Path, *, n_layer=2, n_embd=32, n_head=2, n_positions=128, seed=0,
               dropout: float = 0.1) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def source_glob() -> str:
    return os.path.join(STDLIB, "json", "*.py")


def assert_files_exist() -> None:
    assert all(Path(f).is_file() for f in FILES), FILES
    assert glob.glob(source_glob())
