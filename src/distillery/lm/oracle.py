"""Teacher-hacking monitor: ``distillery lm distill CONFIG --monitor-oracle PATH``.

Tiapkin et al. (2025), "On Teacher Hacking in Language Model Distillation": the teacher is only
an imperfect copy of the distribution we want (the *oracle*).  A student trained to imitate the
teacher can keep getting closer to it (the *proxy* metric falls) while drifting away from the
oracle (the *golden* metric rises after a minimum): the student exploits the teacher's errors.

Every ``monitor.every`` steps this hook measures on held-out batches, per scored token,

* golden  ``oracle_kl``  = KL(oracle || student),
* proxy   ``teacher_kl`` = KL(teacher || student),
* and once, the floor ``oracle_teacher_kl`` = KL(oracle || teacher).

The *hacking signal* is how far the golden metric has risen above its running minimum while the
proxy has kept falling since that minimum (both in nats/token); ``summary()`` says whether it
exceeded ``tolerance`` (1 % of the minimum) by the end of the run.

What differs from the paper: its golden and proxy metrics are distances between the models'
response distributions on held-out prompts; here both are teacher-forced per-token KLs on
held-out text (one forward pass per model, no sampling), a cheaper stand-in that cannot see
errors the student makes only on its own generations.  The training loss is the proxy on the
training data: with a fixed offline set it can keep falling while the held-out proxy stalls.
``hacking_signal_max`` keeps the largest signal seen during the run, since an episode of hacking
can end before the run does.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from distillery.errors import ConfigError
from distillery.lm import data as lmdata
from distillery.lm.config import LMModel, Monitor
from distillery.lm.hooks import HookContext, LMHook


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """(sum over valid tokens of KL(p || q), number of valid tokens)."""
    p = F.log_softmax(p_logits[valid].float(), -1)
    q = F.log_softmax(q_logits[valid].float(), -1)
    return float((p.exp() * (p - q)).sum()), int(valid.sum())


class OracleMonitor(LMHook):
    name = "oracle"

    def __init__(self, spec: Monitor, pad_token: str | None = None, tolerance: float = 0.01):
        self.spec, self.pad_token, self.tolerance = spec, pad_token, tolerance
        self.history: list[dict] = []
        self.floor: float | None = None

    def setup(self, ctx: HookContext) -> None:
        from distillery.lm import models as lmmodels

        if ctx.eval_loader is None:
            raise ConfigError("monitor.oracle measures on held-out data: set data.eval_fraction > 0 or data.eval_source")
        if ctx.teacher is None:
            raise ConfigError("monitor.oracle needs a teacher to compare with")
        spec = LMModel(path=self.spec.oracle)
        oracle_tok = lmmodels.load_tokenizer(spec, self.pad_token or ctx.tokenizer.pad_token)
        diff = lmmodels.vocab_difference(oracle_tok, ctx.tokenizer)
        if diff:
            raise ConfigError(f"the oracle's vocabulary differs from the student's ({diff}): the monitor compares "
                              "token distributions, so oracle, teacher and student need one tokenizer")
        self.oracle = lmmodels.load_model(spec, "oracle").eval().requires_grad_(False).to(ctx.device)
        if self.floor is None:
            self.floor = self._measure(ctx, floor=True)["oracle_teacher_kl"]

    @torch.no_grad()
    def _measure(self, ctx: HookContext, floor: bool = False) -> dict[str, float]:
        V = ctx.vocab
        sums, n = {"oracle_kl": 0.0, "teacher_kl": 0.0, "oracle_teacher_kl": 0.0}, 0
        was = ctx.student.training
        ctx.student.eval()
        for batch in itertools.islice(ctx.eval_loader, self.spec.max_batches):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            valid = batch["targets"] != lmdata.IGNORE
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            o = self.oracle(**kw).logits[..., :V]
            t = ctx.teacher(**kw).logits[..., :V]
            if floor:
                value, k = token_kl(o, t, valid)
                sums["oracle_teacher_kl"] += value
            else:
                s = ctx.student(**kw).logits[..., :V]
                value, k = token_kl(o, s, valid)
                sums["oracle_kl"] += value
                sums["teacher_kl"] += token_kl(t, s, valid)[0]
            n += k
        ctx.student.train(was)
        return {key: value / max(n, 1) for key, value in sums.items()}

    def after_step(self, step: int, ctx: HookContext) -> dict[str, float]:
        if step % self.spec.every and step != ctx.max_steps:
            return {}
        m = self._measure(ctx)
        row = {"step": step, "oracle_kl": m["oracle_kl"], "teacher_kl": m["teacher_kl"]}
        self.history.append(row)
        return {"oracle_kl": row["oracle_kl"], "teacher_kl": row["teacher_kl"], "hacking": self.signal()}

    def signal(self, upto: int | None = None) -> float:
        """Rise of the golden metric above its minimum so far, counted only while the proxy has
        fallen since that minimum (the student keeps approaching the teacher); else 0.
        ``upto``: as it was after the first ``upto`` measurements."""
        history = self.history if upto is None else self.history[:upto]
        if not history:
            return 0.0
        best = min(history, key=lambda r: r["oracle_kl"])
        last = history[-1]
        if last["teacher_kl"] < best["teacher_kl"]:
            return max(0.0, last["oracle_kl"] - best["oracle_kl"])
        return 0.0

    def summary(self) -> dict:
        if not self.history:
            return {}
        best = min(self.history, key=lambda r: r["oracle_kl"])
        last = self.history[-1]
        signal = self.signal()
        return {"oracle": self.spec.oracle, "oracle_teacher_kl": self.floor,
                "oracle_kl_min": best["oracle_kl"], "oracle_kl_min_step": best["step"],
                "oracle_kl_final": last["oracle_kl"], "teacher_kl_final": last["teacher_kl"],
                "hacking_signal": signal,
                "hacking_signal_max": max(self.signal(k) for k in range(1, len(self.history) + 1)),
                "teacher_hacking": signal > self.tolerance * best["oracle_kl"]}

    def state_dict(self) -> dict:
        return {"history": self.history, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.floor = state.get("floor")
