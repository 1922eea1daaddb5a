"""Held-out measurements of a causal-LM student: perplexity, agreement with the teacher, KL,
and the training curves of a run (``curves.png``).  Used by ``distill_lm`` and by every method
that evaluates a student outside it."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from distillery.lm import data as lmdata


@torch.no_grad()
def evaluate_lm(student, teacher, loader, device, vocab: int) -> dict[str, float]:
    """Held-out perplexity of the student (and teacher), next-token agreement (argmax equal)
    and forward KL(teacher || student), all averaged over scored tokens."""
    was = student.training
    student.eval()
    sums = {"nll": 0.0, "teacher_nll": 0.0, "agree": 0.0, "kl": 0.0}
    tokens = 0
    for batch in loader:
        if "pairs" in batch:  # (chosen, rejected) pairs: the chosen sequences are the held-out text
            b = int(batch.pop("pairs"))
            batch = {k: v[:b] for k, v in batch.items()}
        batch = {k: v.to(device) for k, v in batch.items()}
        valid = batch["targets"] != lmdata.IGNORE
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab].float()
        s_lp = F.log_softmax(s[valid], -1)
        tgt = batch["targets"][valid]
        sums["nll"] += float(-s_lp.gather(-1, tgt[:, None]).sum())
        if teacher is not None:
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab].float()
            t_lp = F.log_softmax(t[valid], -1)
            sums["teacher_nll"] += float(-t_lp.gather(-1, tgt[:, None]).sum())
            sums["agree"] += float((s_lp.argmax(-1) == t_lp.argmax(-1)).sum())
            sums["kl"] += float((t_lp.exp() * (t_lp - s_lp)).sum())
        tokens += int(valid.sum())
    student.train(was)
    n = max(tokens, 1)
    out = {"eval_ppl": math.exp(sums["nll"] / n), "eval_tokens": tokens}
    if teacher is not None:
        out.update(teacher_ppl=math.exp(sums["teacher_nll"] / n), agreement=sums["agree"] / n, eval_kl=sums["kl"] / n)
    return out


def plot_curves(history: list[dict], run_dir: Path) -> None:
    """``run_dir/curves.png``: training loss and held-out perplexity against the step."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot([r["step"] for r in history], [r["loss"] for r in history])
    axes[0].set(xlabel="step", ylabel="training loss", title="loss")
    evals = [r for r in history if "eval_ppl" in r]
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], marker="o")
        axes[1].set(xlabel="step", ylabel="held-out perplexity", title="student perplexity")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
