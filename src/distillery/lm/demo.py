"""The offline causal-LM demo: a GPT-2-style teacher trained on the Python standard library,
distilled into a student with >= 4x fewer parameters.

    distillery lm demo            # prepare (tokenizer, teacher, student init) then distil
    distillery lm prepare         # only the preparation, into runs/lm/

Everything is real and local: the corpus is this interpreter's own standard-library sources
(``sysconfig``'s stdlib directory, top-level modules), the tokenizer a byte-level BPE trained
with Hugging Face ``tokenizers``, the models ``transformers`` GPT-2 configurations.  The teacher
is trained by the same loop as every distillation (``loss: ce``, no teacher), so the demo also
shows a from-scratch baseline.  Preparation is idempotent: each artefact is written atomically
and reused when present.
"""
from __future__ import annotations

import glob
import os
import shutil
import sysconfig
from pathlib import Path

from distillery.errors import DataError

ROOT = Path("runs/lm")
#: GPT-2 shapes of the demo; the student has 4.2x fewer parameters than the teacher.
TEACHER_SHAPE = dict(n_layer=4, n_embd=192, n_head=3)
STUDENT_SHAPE = dict(n_layer=2, n_embd=96, n_head=2)
VOCAB = 4096
DEMO_SOURCE = "stdlib:*.py"  # resolved by distillery.lm.data.resolve_source on each machine
CONTEXT = 256


def stdlib_source() -> str:
    """A glob of the top-level standard-library modules (about 170 files, 4.7 MB)."""
    from distillery.lm.data import resolve_source

    pattern = resolve_source(DEMO_SOURCE)
    if not glob.glob(pattern):
        stdlib = sysconfig.get_paths()["stdlib"]
        raise DataError(f"no Python sources under {stdlib}: the LM demo reads the standard library's .py files")
    return pattern


def _atomic_dir(final: Path, write) -> Path:
    if final.exists():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    os.replace(tmp, final)
    return final


def train_tokenizer(out: Path, files: list[str], vocab_size: int = VOCAB) -> Path:
    """Byte-level BPE (GPT-2's scheme) trained on ``files``, saved as a transformers tokenizer
    with ``<|endoftext|>`` as BOS/EOS/pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    def write(tmp: Path) -> None:
        bpe = ByteLevelBPETokenizer()
        bpe.train(files, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", model_max_length=CONTEXT)
        tok.save_pretrained(tmp)

    return _atomic_dir(out, write)


def init_model(out: Path, tokenizer_dir: Path, shape: dict, seed: int = 0) -> Path:
    """A randomly initialised GPT-2 of ``shape`` with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    def write(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, bos_token_id=tok.eos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
        GPT2LMHeadModel(config).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_dir(out, write)


def demo_config(name: str, *, teacher: str | None, student: str, objective: str = "forward_kl", steps: int = 300,
                root: Path = ROOT, **sections) -> dict:
    """The raw config of one demo run (student/teacher paths under ``root``)."""
    raw = {
        "name": name,
        "output_dir": str(root),
        "student": {"path": student},
        "data": {"source": DEMO_SOURCE, "format": "text", "block_size": 128, "eval_fraction": 0.05,
                 "max_eval_blocks": 64},
        "loss": {"name": objective},
        "train": {"max_steps": steps, "batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 100},
    }
    if teacher is not None:
        raw["teacher"] = {"path": teacher}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def prepare(root: Path = ROOT, teacher_steps: int = 1500, progress: bool = True) -> dict[str, Path]:
    """Tokenizer, trained teacher and the student's initial weights under ``root``."""
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    root.mkdir(parents=True, exist_ok=True)
    files = sorted(glob.glob(stdlib_source()))
    tok = train_tokenizer(root / "tokenizer", files)
    teacher_init = init_model(root / "teacher-init", tok, TEACHER_SHAPE, seed=0)
    student_init = init_model(root / "student-init", tok, STUDENT_SHAPE, seed=1)
    teacher_run = root / "teacher-train"
    if not (teacher_run / "student" / "config.json").is_file():
        cfg = lm_config_from_dict(demo_config("teacher-train", teacher=None, student=str(teacher_init), objective="ce",
                                              steps=teacher_steps, root=root, train={"lr": 2e-3}))
        distill_lm(cfg, resume=(teacher_run / "checkpoints").is_dir(), overwrite=False)
    teacher = root / "teacher"
    if not teacher.exists():
        shutil.copytree(teacher_run / "student", root / "teacher.tmp", dirs_exist_ok=True)
        os.replace(root / "teacher.tmp", teacher)
    return {"tokenizer": tok, "teacher": teacher, "student_init": student_init}


def run_demo(root: Path = ROOT, steps: int = 300, teacher_steps: int = 800) -> dict[str, dict]:
    """Prepare, then the same student from scratch (ce) and distilled (forward KL)."""
    import json

    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    paths = prepare(root, teacher_steps=teacher_steps)
    out = {}
    for name, teacher, objective in (("demo-ce", None, "ce"), ("demo-fkl", str(paths["teacher"]), "forward_kl")):
        run_dir = root / name
        if (run_dir / "summary.json").is_file():
            out[name] = json.loads((run_dir / "summary.json").read_text())
            continue
        cfg = lm_config_from_dict(demo_config(name, teacher=teacher, student=str(paths["student_init"]),
                                              objective=objective, steps=steps, root=root))
        out[name] = distill_lm(cfg, resume=(run_dir / "checkpoints").is_dir()).summary
    return out
