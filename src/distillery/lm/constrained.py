"""Lexically constrained decoding in the manner of NeuroLogic decoding, on any ``transformers`` causal LM.

Lu et al. (2021), "NeuroLogic Decoding: (Un)supervised Neural Text Generation with Predicate Logic
Constraints" -- the decoder I2D2 (Bhagavatula et al., 2023, "I2D2: Inductive Knowledge Distillation
with NeuroLogic and Self-Imitation") uses to make its small generator write what the prompt asks
for.  Constraints are phrases that must appear in the continuation (positive) or must not
(negative).  Each step of a beam search:

1. expands every live hypothesis by its top tokens (the top ``2 x num_beams`` over all beams,
   as ``transformers``' beam search does) plus, for every unmet constraint, the token that starts
   or continues it -- the step that lets a low-probability constraint enter the beam at all;
2. prunes candidates whose text contains a negative constraint;
3. *groups* candidates by the number of constraints they satisfy (NeuroLogic's clause count),
   plus the fraction of an unmet phrase they are in the middle of writing (its partial
   satisfaction: otherwise a multi-token phrase is evicted by likelier free text before it ends);
4. fills the next beam round-robin over the groups, most-satisfied group first, best log p(y)
   within a group -- so hypotheses that met more constraints are kept even when less likely, and
   the likely ones are not all evicted.  Within a group the rules are ``transformers``': only a
   group's top ``num_beams`` candidates may finish.

A hypothesis finishes with EOS or with a token whose text contains a stop string (e.g. ``"\\n"``
for one line of code); finished hypotheses are ranked by ``score = log p / length ^ length_penalty +
bonus x satisfied`` (NeuroLogic's lambda-weighted objective; ``bonus=inf`` ranks by satisfied
constraints first).  With no constraints there is one group and the search is ``transformers``'
beam search (``early_stopping=False``), which the tests check token for token against
``model.generate(num_beams=...)``.

Differences from the paper: a constraint is a string and is satisfied when the decoded text
contains it as whole words (NeuroLogic tracks token-level phrase states; text containment is tokenisation-
agnostic, which matters for byte-level BPE, where " return" and "return" are different tokens);
clauses are single literals (a conjunction of phrases), not general CNF; there is no look-ahead
(that is NeuroLogic A*esque, a later paper).  ``transformers`` 5 no longer ships constrained beam
search (``force_words_ids`` / ``Constraint`` now download Hub code and need
``trust_remote_code``), so this module is needed; it reads the model's logits and keeps its
key/value cache (``cache``, formerly ``past_key_values``), reordered as beams are selected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Hypothesis:
    ids: list[int]        # generated tokens (the finishing EOS / stop token included)
    text: str             # decoded, cut before the first stop string
    logprob: float        # summed log-probability of ``ids`` under the model
    satisfied: int        # positive constraints the text contains
    score: float          # logprob / len(ids) ** length_penalty


def stop_token_ids(tokenizer, stop: list[str]) -> set[int]:
    """Every vocabulary token whose text contains a stop string (byte-level BPE merges "\\n" into
    tokens such as "\\n    ", so the stop is a set of tokens, not one)."""
    if not stop:
        return set()
    out = set()
    for i in range(len(tokenizer)):
        piece = tokenizer.decode([i])
        if any(s in piece for s in stop):
            out.add(i)
    return out


def satisfied(phrase: str, text: str) -> bool:
    """``phrase`` occurs in ``text`` as whole words: "return" is met by "return x", not by
    "returns"; a parameter ``a`` is not met by every "a" inside another word."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) is not None


def _cut(text: str, stop: list[str]) -> str:
    hits = [text.find(s) for s in stop if s in text]
    return text[:min(hits)] if hits else text


def _phrase_variants(tokenizer, phrase: str) -> list[list[int]]:
    """Token sequences that write ``phrase``: as it is and after a space (byte-level BPE's ' x')."""
    variants = []
    for text in (phrase, " " + phrase):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in variants:
            variants.append(ids)
    return variants


def _progress(generated: list[int], variants: list[list[int]]) -> float:
    """How far the hypothesis is into writing an unmet constraint: j / len(variant) for the
    longest proper prefix of a variant it ends with (0 when none)."""
    best = 0.0
    for ids in variants:
        for j in range(len(ids) - 1, 0, -1):
            if len(generated) >= j and generated[-j:] == ids[:j]:
                best = max(best, j / len(ids))
                break
    return best


def _next_constraint_tokens(generated: list[int], variants: list[list[int]]) -> set[int]:
    """The token that starts each variant, and the one that continues it when the hypothesis
    ends with a proper prefix of the variant (NeuroLogic's in-progress constraints)."""
    out = set()
    for ids in variants:
        out.add(ids[0])
        for j in range(len(ids) - 1, 0, -1):
            if len(generated) >= j and generated[-j:] == ids[:j]:
                out.add(ids[j])
                break
    return out


@torch.no_grad()
def constrained_beam_search(model, tokenizer, prompt: str | list[int], constraints: list[str] = (), *,
                            banned: list[str] = (), num_beams: int = 4, max_new_tokens: int = 32, bonus: float = 2.0,
                            num_return: int = 1, stop: list[str] = (), stop_ids: set[int] | None = None,
                            length_penalty: float = 1.0) -> list[Hypothesis]:
    """Decode one prompt; returns up to ``num_return`` finished hypotheses, best first.

    ``stop_ids`` may be given precomputed (:func:`stop_token_ids`) to save decoding the vocabulary
    on every call."""
    if num_beams < 1 or max_new_tokens < 1 or num_return < 1:
        raise ValueError("num_beams, max_new_tokens and num_return must be >= 1")
    if num_return > num_beams:
        raise ValueError(f"num_return ({num_return}) cannot exceed num_beams ({num_beams}): raise num_beams")
    stop = list(stop)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    finishing = (set(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, stop)) | ({eos} if eos is not None else set())
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
    variants = [_phrase_variants(tokenizer, c) for c in constraints]

    def text_of(ids: list[int]) -> str:
        return _cut(tokenizer.decode(ids, skip_special_tokens=True), stop)

    def count(text: str) -> int:
        return sum(satisfied(c, text) for c in constraints)

    was = model.training
    model.eval()
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    past, logits = out.cache, out.logits[:, -1].float()
    beams: list[tuple[list[int], float]] = [([], 0.0)]  # one live beam = HF's num_beams copies, all but one at -1e9
    finished: list[Hypothesis] = []

    def rank(h: Hypothesis) -> float:
        return h.score + bonus * h.satisfied

    for step in range(max_new_tokens):
        total = torch.tensor([lp for _, lp in beams], device=logits.device)[:, None] + F.log_softmax(logits, -1)
        vocab = total.shape[1]
        k = min(2 * num_beams, total.numel())
        top_lp, top_idx = torch.topk(total.flatten(), k)
        candidates = [(int(i) // vocab, int(i) % vocab) for i in top_idx]
        seen = set(candidates)
        for b, (ids, _) in enumerate(beams):  # constraint tokens enter even when unlikely
            for c, var in zip(constraints, variants):
                if satisfied(c, text_of(ids)):
                    continue
                for t in _next_constraint_tokens(ids, var):
                    if (b, t) not in seen:
                        seen.add((b, t))
                        candidates.append((b, t))
        scored = []  # (beam, token, logprob, satisfied, text)
        for b, t in candidates:
            ids = beams[b][0] + [t]
            text = text_of(ids)
            if any(x in text for x in banned):
                continue
            met = [satisfied(c, text) for c in constraints]
            # group key: met constraints + progress into an unmet one (NeuroLogic's partial
            # satisfaction), so a phrase being written is not evicted by likelier free text
            partial = max((_progress(ids, v) for v, m in zip(variants, met) if not m), default=0.0)
            scored.append((b, t, float(total[b, t]), round(sum(met) + partial, 6), text))
        # Within a group, HF's order (cumulative log-prob) and HF's rule: only the group's top
        # num_beams ranks may finish a hypothesis, the others only back up the running beams.
        scored.sort(key=lambda s: -s[2])
        last = step == max_new_tokens - 1
        groups: dict[int, list] = {}
        ranks: dict[int, int] = {}
        for b, t, lp, sat, text in scored:
            ids = beams[b][0] + [t]
            r = ranks[sat] = ranks.get(sat, -1) + 1
            if t in finishing or last:
                if r < num_beams:
                    finished.append(Hypothesis(ids, text, lp, int(sat), lp / len(ids) ** length_penalty))
                continue
            groups.setdefault(sat, []).append((b, ids, lp))
        finished = sorted(finished, key=rank, reverse=True)[:num_beams]
        if last or not groups:
            break
        chosen = []
        order = sorted(groups, reverse=True)
        while len(chosen) < num_beams and any(groups[g] for g in order):
            for g in order:
                if groups[g] and len(chosen) < num_beams:
                    chosen.append(groups[g].pop(0))
        # HF's early-stopping heuristic: stop when no running beam can beat the worst kept finished one
        if len(finished) >= num_beams:
            bound = max(lp / len(ids) ** length_penalty + bonus * count(text_of(ids)) for _, ids, lp in chosen)
            if bound <= rank(finished[-1]):
                break
        beams = [(ids, lp) for _, ids, lp in chosen]
        index = torch.tensor([b for b, _, _ in chosen], device=device)
        past.reorder_cache(index)
        step_ids = torch.tensor([[ids[-1]] for ids, _ in beams], device=device)
        out = model(input_ids=step_ids, cache=past, use_cache=True)
        past, logits = out.cache, out.logits[:, -1].float()
    model.train(was)
    return sorted(finished, key=rank, reverse=True)[:num_return]
