"""Load causal LMs and tokenizers, and check that a teacher and a student can be distilled.

Everything here runs before the first training step, so that a wrong path, a vocabulary
mismatch, a missing pad token or a too-long block stops the run with one message that names
the fix, instead of a shape error inside the loss an hour later.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillery.errors import ConfigError, ModelError
from distillery.lm.config import LMModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _where(spec: LMModel) -> str:
    return spec.path if Path(spec.path).exists() else f"{spec.path} (Hub id)"


def load_tokenizer(spec: LMModel, pad_token: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {_where(spec)}: {err}. Save one next to the model "
                         "(tokenizer.save_pretrained(dir)) or check the path / Hub id.") from None
    if tok.pad_token is None:
        if pad_token is None:
            eos = f" (its EOS token is {tok.eos_token!r})" if tok.eos_token else ""
            raise ConfigError(f"the tokenizer of {spec.path} has no pad token: set data.pad_token to one of its "
                              f"tokens{eos}, e.g. --set data.pad_token='{tok.eos_token or '<pad>'}'")
        if pad_token not in tok.get_vocab():
            raise ConfigError(f"data.pad_token {pad_token!r} is not in the vocabulary of {spec.path}: "
                              "choose an existing token such as the EOS token")
        tok.pad_token = pad_token
    return tok


def eos_token_of(spec: LMModel) -> str | None:
    """The EOS token of a model's tokenizer (a pad token for generation-only use); None if unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code).eos_token
    except (OSError, ValueError):
        return None  # load_tokenizer reports the problem


def load_model(spec: LMModel, role: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    try:
        if spec.init == "random":
            config = AutoConfig.from_pretrained(spec.path, **kwargs)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code,
                                                     dtype=_DTYPES[spec.dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=_DTYPES[spec.dtype], use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the {role} causal LM from {_where(spec)}: {err}. It must be a directory written "
                         "by save_pretrained (config.json + model.safetensors) or a Hub id of a causal LM.") from None
    if spec.lora is not None:
        model = _with_lora(model, spec)
    return model


def _with_lora(model: nn.Module, spec: LMModel) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("student.lora needs peft: pip install peft") from None
    lora = spec.lora
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as err:
        raise ConfigError(f"student.lora: {err}. Set student.lora.target_modules to module names of this model "
                          "(e.g. [c_attn] for GPT-2, [q_proj, v_proj] for Llama)") from None


@dataclass
class Vocab:
    """What the trainer needs to know about the two vocabularies."""

    size: int  # len(tokenizer): logits beyond it (padding rows of the embedding) are cut off
    same: bool


def vocab_difference(teacher_tok, student_tok) -> str:
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t == s:
        return ""
    only_t = sorted(set(t) - set(s))[:3]
    only_s = sorted(set(s) - set(t))[:3]
    moved = [k for k in set(t) & set(s) if t[k] != s[k]][:3]
    parts = [f"teacher {len(t)} tokens, student {len(s)}"]
    if only_t:
        parts.append(f"only the teacher has {only_t}")
    if only_s:
        parts.append(f"only the student has {only_s}")
    if moved:
        parts.append(f"{moved} have different ids")
    return "; ".join(parts)


def check_pair(teacher, teacher_tok, student, student_tok, loss_name: str) -> Vocab:
    """Token-level losses compare distributions over the same ids: refuse another vocabulary
    unless the loss is ULD, which compares sorted probabilities and needs no shared ids."""
    diff = vocab_difference(teacher_tok, student_tok)
    if diff and loss_name != "uld":
        raise ConfigError(f"teacher and student tokenizers differ ({diff}). Token-level losses need one vocabulary: "
                          "give the student the teacher's tokenizer, or use loss.name: uld (Universal Logit "
                          "Distillation, for different tokenizers)")
    size = len(student_tok)
    for model, role, tok in ((teacher, "teacher", teacher_tok), (student, "student", student_tok)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(tok):
            raise ConfigError(f"the {role}'s LM head has {rows} outputs but its tokenizer has {len(tok)} tokens: "
                              "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) and save again")
    return Vocab(size=size, same=not diff)


def context_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(models: dict[str, nn.Module], block_size: int, extra: int = 0) -> None:
    """``extra``: tokens generated after a block (on-policy / sequence-level KD)."""
    for role, model in models.items():
        limit = context_length(model)
        if limit is not None and block_size + extra > limit:
            plus = f" + {extra} generated tokens" if extra else ""
            raise ConfigError(f"sequences of data.block_size {block_size}{plus} exceed the {role}'s context of "
                              f"{limit} tokens: set data.block_size <= {limit - extra}")


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
