"""Log-likelihoods of texts under a causal LM: the measurement behind data selection (MiniPLM's
difference sampling, DDK's domain gaps), critics, relabelling and in-context scoring.

``score_texts(model, tok, texts, contexts=None)`` returns for each text the summed log-probability
of its tokens and their count, optionally conditioned on a context string that is not scored
(``log p(text | context)``).  Without a context the text is conditioned on the tokenizer's BOS
token (EOS for GPT-2-style tokenizers, their document separator), so its first token is scored too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillery.engine.progress import ProgressBar
from distillery.errors import DataError


@dataclass
class Scores:
    logprob: torch.Tensor  # (N,) summed log-probability of each text's scored tokens
    tokens: torch.Tensor   # (N,) number of scored tokens

    @property
    def per_token(self) -> torch.Tensor:
        return self.logprob / self.tokens.clamp_min(1)


def _start_id(tok) -> int:
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return tid
    raise DataError("scoring a text without context needs a BOS or EOS token to condition on; the tokenizer has neither")


@torch.no_grad()
def score_texts(model, tok, texts: list[str], contexts: list[str] | None = None, *, max_length: int | None = None,
                batch_size: int = 16, device=None, progress: bool = False, title: str = "scoring") -> Scores:
    """``log p(text | context)`` summed over the text's tokens (at most ``max_length`` tokens in all;
    longer inputs keep the context and the start of the text)."""
    from distillery.lm.models import context_length

    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts")
    device = device if device is not None else next(model.parameters()).device
    limit = max_length or context_length(model) or 1024
    pad = tok.pad_token_id if tok.pad_token_id is not None else _start_id(tok)
    rows: list[tuple[list[int], int]] = []  # (ids, number of context tokens)
    for i, text in enumerate(texts):
        ctx = tok(contexts[i], add_special_tokens=False)["input_ids"] if contexts is not None and contexts[i] else [_start_id(tok)]
        body = tok(text, add_special_tokens=False)["input_ids"]
        if len(ctx) >= limit:
            raise DataError(f"context {i} has {len(ctx)} tokens, more than the {limit} the scorer can read: shorten it")
        rows.append(((ctx + body)[:limit], len(ctx)))
    logprob = torch.zeros(len(rows))
    counts = torch.zeros(len(rows), dtype=torch.long)
    was = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    with ProgressBar(len(rows), enabled=progress, title=title) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            length = max(len(rows[i][0]) for i in idx)
            ids = torch.full((len(idx), length), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            scored = torch.zeros((len(idx), length), dtype=torch.bool)
            for r, i in enumerate(idx):
                seq, n_ctx = rows[i]
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
                scored[r, n_ctx:len(seq)] = True  # positions whose token is scored
            ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            keep = scored[:, 1:]
            logprob[idx] = (lp * keep).sum(1).cpu()
            counts[idx] = keep.sum(1).cpu()
            bar.step(loss=float("nan"), samples=len(idx), advance=len(idx))
    model.train(was)
    return Scores(logprob, counts)
