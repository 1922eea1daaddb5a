"""REDI on a verifiable task: does learning from the teacher's *wrong* traces help the student?

    python benchmarks/lm_data/redi.py            # full: 2 seeds, ~4 min on one core (+ the teacher once)
    python benchmarks/lm_data/redi.py --quick    # smoke: 1 seed, a few steps (the cached teacher)

Xu et al. (2025), "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for
LLM Reasoning", on 3-digit addition written column by column (``distillery.lm.redi``):

* teacher = GPT-2 3x128 with the demo tokenizer, trained on correct traces of 4000 problems
  (cached at ``runs/lm/redi-teacher``); it samples 4 traces per training problem at temperature 1,
  and the verifier splits them into positives and negatives;
* student = GPT-2 2x64, fresh per seed, in two arms with the same number of optimiser steps:
  **SFT** on the positives only for sft+redi steps, and **SFT → REDI**: SFT for sft steps, then
  the REDI objective (α = 0.8) on (positive, negative) pairs of the same problem;
* metric = greedy accuracy on 200 held-out problems (the verifier on the final answer).
"""
from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _budget(quick: bool) -> dict:
    if quick:
        # the same cached teacher as the full run (built once, ~2 CPU minutes, when it is missing)
        return dict(seeds=[0], sft=20, redi=10, train=48, eval=40, teacher="runs/lm/redi-teacher",
                    teacher_steps=500, teacher_problems=4000)
    return dict(seeds=[0, 1], sft=300, redi=150, train=600, eval=200, teacher="runs/lm/redi-teacher",
                teacher_steps=500, teacher_problems=4000)


def _config(b: dict, seed: int, arm: str, root: Path):
    from distillery.lm.redi import load_redi_config

    over = [f"output_dir={root}", f"name={arm}-s{seed}", f"seed={seed}", f"teacher.path={b['teacher']}",
            f"teacher_build.steps={b['teacher_steps']}", f"teacher_build.problems={b['teacher_problems']}",
            f"task.train_problems={b['train']}", f"task.eval_problems={b['eval']}", f"traces_file={root}/traces.jsonl",
            "progress=false"]
    if arm == "sft":
        over += [f"sft.steps={b['sft'] + b['redi']}", "redi.steps=0"]
    else:
        over += [f"sft.steps={b['sft']}", f"redi.steps={b['redi']}"]
    return load_redi_config(REPO / "configs/lm/data/redi.yaml", over)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def run(quick: bool, out_dir: Path) -> str:
    import os

    from distillery.lm.redi import run_redi

    torch.set_num_threads(1)
    os.chdir(REPO)  # the config's paths are relative to the repository root
    b = _budget(quick)
    root = REPO / "benchmarks/runs/lm_data" / ("redi-quick" if quick else "redi")
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {"sft": [], "redi": []}
    for seed in b["seeds"]:
        for arm in ("sft", "redi"):
            results[arm].append(run_redi(_config(b, seed, arm, root)))
    wall = time.perf_counter() - t0
    first = results["redi"][0]
    cpu = sum(r.get("cpu_seconds", 0.0) for arm in results.values() for r in arm)
    rows = [
        ("teacher, greedy", "—", _mean_std([first["teacher_greedy_accuracy"]])),
        ("teacher, sampled at T=1 (share of verified traces)", "—", _mean_std([first["teacher_sample_accuracy"]])),
        (f"student: SFT on positives ({b['sft'] + b['redi']} steps)", "positives",
         _mean_std([r["accuracy"] for r in results["sft"]])),
        (f"student: SFT ({b['sft']} steps) → REDI α=0.8 ({b['redi']} steps)", "positives + negatives",
         _mean_std([r["accuracy"] for r in results["redi"]])),
        (f"  (the same students after SFT alone, {b['sft']} steps)", "positives",
         _mean_std([r["sft"]["accuracy"] for r in results["redi"]])),
    ]
    gain = [r["accuracy"] - s["accuracy"] for r, s in zip(results["redi"], results["sft"])]
    lines = [
        "## REDI: reinforcement distillation from negative traces",
        "",
        f"Setup: {b['train']} three-digit addition problems, the teacher (GPT-2 3x128, trained on correct traces of "
        f"{b['teacher_problems']} other problems for {b['teacher_steps']} steps x 32) samples 4 traces each at T=1 "
        f"({first['traces']} traces: {first['positives']} verified correct, {first['negatives']} wrong); students GPT-2 "
        f"2x64 (fresh per seed), batch 32 sequences for SFT and 16 pairs for REDI (≤ 96 tokens), seeds "
        f"{b['seeds']}; greedy accuracy on {b['eval']} held-out problems, mean ± std over seeds.",
        "",
        "| model | training traces | held-out accuracy (%) |",
        "|---|---|---|",
        *[f"| {a} | {t} | {v} |" for a, t, v in rows],
        "",
        f"REDI − SFT-only, per seed: {', '.join(f'{100 * g:+.1f}' for g in gain)} points. CPU time of the student "
        f"runs (trace sampling included, teacher training excluded): {cpu / 60:.1f} min in all, the sum of each run's "
        f"own CPU seconds (this invocation's wall time {wall / 60:.1f} min: finished runs are reused, and the machine's "
        "2 cores are shared with other jobs).",
        "",
        _reading(results, gain, _negative_kinds(root / "traces.jsonl")),
    ]
    return "\n".join(lines) + "\n"


def _negative_kinds(path: Path) -> str:
    """What the wrong traces got wrong: a column step, or only the final assembly of the digits."""
    import json

    from distillery.lm.redi import addition_trace, final_answer

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    neg = [r for r in rows if not r["correct"]]
    none = sum(final_answer(r["response"]) is None for r in neg)
    step = sum(final_answer(r["response"]) is not None and r["response"].split(" ; ans")[0]
               != addition_trace(r["a"], r["b"])[1].split(" ; ans")[0] for r in neg)
    return (f"Of the {len(neg)} wrong traces, {100 * step / len(neg):.0f}% have a wrong column step, "
            f"{100 * (len(neg) - step - none) / len(neg):.0f}% right steps but a wrong final answer, and "
            f"{100 * none / len(neg):.0f}% no answer")


def _reading(results: dict, gain: list[float], kinds: str) -> str:
    mean_gain = statistics.mean(gain)
    spread = statistics.stdev([r["accuracy"] for r in results["sft"]]) if len(gain) > 1 else 0.0
    if mean_gain > max(spread, 0.01):
        verdict = ("with the same number of steps, spending the last ones on REDI pairs gave a higher accuracy than "
                   "more SFT on the positives, as in the paper")
    elif mean_gain < -max(spread, 0.01):
        verdict = "REDI was *worse* than spending the same steps on more SFT on the positives"
    else:
        verdict = "REDI and more SFT on the positives ended within the seed-to-seed spread"
    short = statistics.mean(r["sft"]["accuracy"] for r in results["redi"])
    long = statistics.mean(r["accuracy"] for r in results["sft"])
    still_learning = long > 2 * short + 0.02
    why = (f" The SFT learning curve was still steep where REDI took over ({100 * short:.1f}% after the shorter SFT, "
           f"{100 * long:.1f}% after the longer one): the paper starts REDI from an SFT model that has plateaued, and "
           "here the extra SFT steps (at SFT's learning rate, 5x REDI's) are worth more than anything the pairs can "
           "add, so this budget measures the SFT curve more than REDI. A fair test needs SFT run to a plateau first (a "
           "longer SFT than this budget; not measured here).") if still_learning else ""
    return (f"Reading: {verdict} (mean difference {100 * mean_gain:+.1f} points over {len(gain)} seed(s)).{why} "
            f"{kinds}: near-misses that share most tokens with a right trace, which REDI's length-normalised negative "
            "term pushes down as a whole. At this scale and with two seeds the comparison is indicative, not a "
            "replication of the paper's MATH-500 numbers.")


if __name__ == "__main__":
    from distillery.report.metrics import machine_description

    out = REPO / "benchmarks" / "results" / "lm_data"
    out.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv
    section = run(quick=quick, out_dir=out)
    command = "python benchmarks/lm_data/redi.py" + (" --quick" if quick else "")
    stamp = f"\n_Command: `{command}`, {dt.date.today().isoformat()}, {machine_description()}; torch {torch.__version__}._\n"
    (out / ("redi-quick.md" if quick else "redi.md")).write_text(section + stamp)
    print(section + stamp)
