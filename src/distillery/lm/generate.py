"""Text the models write during distillation: the student's own continuations (GKD) and the
teacher's outputs for sequence-level KD.  Generation goes through ``transformers.generate``.

Both return batches in the trainer's format (``input_ids``, ``attention_mask``, ``targets``
aligned with the logits, ``prompt_len``): only the generated tokens are scored, up to and
including the first EOS; the prompt and anything after EOS are masked (-100).
"""
from __future__ import annotations

import torch

from distillery.lm.data import IGNORE


def prompts_of(batch: dict[str, torch.Tensor], prompt_length: int) -> list[torch.Tensor]:
    """Each row's prompt: its own prompt part (prompt/response data), or for packed text --
    where every token is a target -- the first ``prompt_length`` tokens of the block."""
    out = []
    for ids, mask, p in zip(batch["input_ids"], batch["attention_mask"], batch["prompt_len"]):
        n = int(p) if int(p) > 0 else min(prompt_length, int(mask.sum()) - 1)
        out.append(ids[: max(1, n)])
    return out


def _scored(prompt_len: int, sequence: torch.Tensor, eos_id: int | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, attention) of one generated sequence: tokens after the prompt up to the first EOS."""
    length = sequence.numel()
    gen = sequence[prompt_len:]
    stop = gen.numel()
    if eos_id is not None:
        hits = (gen == eos_id).nonzero()
        if hits.numel():
            stop = int(hits[0]) + 1  # the EOS itself is learned
    end = prompt_len + stop
    targets = torch.full((length,), IGNORE, dtype=torch.long)
    targets[prompt_len - 1:end - 1] = sequence[prompt_len:end]
    attention = torch.zeros(length, dtype=torch.long)
    attention[:end] = 1
    return targets, attention


@torch.no_grad()
def generate_batch(model, prompts: list[torch.Tensor], *, max_new_tokens: int, pad_id: int, eos_id: int | None,
                   do_sample: bool, temperature: float = 1.0, top_k: int | None = None, num_beams: int = 1,
                   device=None) -> dict[str, torch.Tensor]:
    """Continue each prompt and return a right-padded training batch.

    Prompts of equal length are generated together; otherwise one by one (no left padding, so
    that the positions a model sees while generating are those it sees when it is scored)."""
    was_training = model.training
    model.eval()
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, num_beams=num_beams,
                  do_sample=do_sample)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or 0)
    groups = [prompts] if len({p.numel() for p in prompts}) == 1 else [[p] for p in prompts]
    sequences: list[torch.Tensor] = []
    for group in groups:
        x = torch.stack(group).to(device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        sequences.extend(row.cpu() for row in out)
    if was_training:
        model.train()
    length = max(s.numel() for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    targets = torch.full((n, length), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, sequences)):
        t, a = _scored(p.numel(), s, eos_id, pad_id)
        input_ids[i, : s.numel()], targets[i, : s.numel()], attention[i, : s.numel()] = s, t, a
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention,
            "prompt_len": torch.as_tensor([p.numel() for p in prompts])}
