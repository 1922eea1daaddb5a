"""Causal-LM distillation on the offline demo: which token-level objective, dense or cached.

    python benchmarks/lm_distill.py                 # full: 3 seeds, every objective
    python benchmarks/lm_distill.py --quick         # smoke: 1 seed, few steps

Teacher: the demo's GPT-2 (``distillery lm prepare``: byte-level BPE 4k, 4 layers x 192, trained
on this interpreter's standard-library sources); student: GPT-2 2 layers x 96 (4.2x fewer
parameters), fresh random weights per seed.  Every student gets the same budget (steps x batch
x block tokens) and is evaluated on held-out standard-library modules: perplexity, next-token
agreement with the teacher (argmax equal), KL(teacher || student).  Cached rows read the
teacher's top-k log-probabilities + tail mass from one store built once
(``distillery.lm.cache``); the loss is then taken between the (k+1)-bucket coarsenings
(``distillery.losses.lm_sparse.topk_buckets``).  GKD generates text with the live student, so it has no
cached row.  Writes benchmarks/results/lm_distill.md and lm_distill.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROWS = [  # (label, loss, params, extra sections)
    ("CE only (no teacher)", "ce", {}, {}),
    ("forward KL", "forward_kl", {}, {}),
    ("reverse KL", "reverse_kl", {}, {}),
    ("JSD(0.5)", "jsd", {"beta": 0.5}, {}),
    ("skew KL (α=0.1)", "skew_kl", {"alpha": 0.1}, {}),
    ("TAID", "taid", {}, {}),
    ("GKD (λ=0.5, JSD 0.5)", "jsd", {"beta": 0.5}, {"onpolicy": {"lmbda": 0.5, "max_new_tokens": 64, "prompt_length": 32}}),
]


def machine() -> str:
    from distillery.report.metrics import machine_description

    return f"{machine_description()}; torch {torch.__version__}"


def run_one(raw: dict, root: Path) -> dict:
    from distillery.lm.config import dump_lm_config, lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    cfg = lm_config_from_dict(raw)
    run_dir = Path(cfg.output_dir) / cfg.name
    summary = run_dir / "summary.json"
    if summary.is_file() and (run_dir / "config.yaml").read_text() == dump_lm_config(cfg):
        return json.loads(summary.read_text())  # same config, finished: reuse
    resume = (run_dir / "checkpoints").is_dir() and (run_dir / "config.yaml").is_file() and \
        (run_dir / "config.yaml").read_text() == dump_lm_config(cfg)
    return distill_lm(cfg, resume=resume, overwrite=not resume).summary


def agreement_with(teacher_dir: str, raw: dict, summary: dict) -> dict:
    """For a run trained without a teacher (CE only): the same held-out metrics against the teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.lm import data as lmdata
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.evaluate import evaluate_lm

    cfg = lm_config_from_dict(raw)
    run_dir = Path(cfg.output_dir) / cfg.name
    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    splits = lmdata.load_splits(cfg.data, tok)
    loader = torch.utils.data.DataLoader(splits.eval, batch_size=cfg.train.batch_size,
                                         collate_fn=lambda rows: lmdata.collate(rows, tok.pad_token_id))
    return {**summary, **evaluate_lm(student, teacher, loader, torch.device("cpu"), len(tok))}


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/lm"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=16, help="Top-k of the cached rows.")
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 steps (a smoke test of the script).")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm_distill.md")
    ap.add_argument("--note", default="", help="A line added to the header (e.g. how the runs shared the machine).")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 5, [0]

    from distillery.lm.demo import demo_config, prepare

    torch.set_num_threads(max(1, torch.get_num_threads()))
    paths = prepare(args.root)
    bench = args.root / ("bench-quick" if args.quick else "bench")
    results: dict[tuple[str, str], list[dict]] = {}
    t_start = time.time()
    for label, loss, params, extra in ROWS:
        modes = ["dense"] if loss == "ce" or "onpolicy" in extra else ["dense", "cached"]
        if loss == "forward_kl":
            modes.append("sampled")  # Random Sampling KD: unbiased, forward KL only
        for mode in modes:
            for seed in args.seeds:
                name = f"{loss}{'-gkd' if 'onpolicy' in extra else ''}-{mode}-s{seed}"
                sections = {"loss": {"name": loss, "params": params},
                            "train": {"seed": seed, "batch_size": args.batch_size, "progress": False,
                                      "checkpoint_every": 100},
                            **extra}
                if mode == "sampled":
                    sections["cache"] = {"scheme": "sample", "k": args.k,
                                         "dir": str(args.root / f"bench-cache-sample{args.k}")}
                if mode == "cached":
                    sections["cache"] = {"scheme": "topk", "k": args.k, "tail": True,
                                         "dir": str(args.root / f"bench-cache-topk{args.k}")}  # shared by --quick and full
                raw = demo_config(name, teacher=None if loss == "ce" else str(paths["teacher"]),
                                  student=str(paths["student_init"]), objective=loss, steps=args.steps, root=bench,
                                  **sections)
                raw["student"]["init"] = "random"  # fresh weights per seed (the architecture of student-init)
                t0 = time.time()
                summary = run_one(raw, bench)
                if summary.get("agreement") is None:
                    summary = agreement_with(str(paths["teacher"]), raw, summary)
                summary.setdefault("seconds", time.time() - t0)
                results.setdefault((label, mode), []).append(summary)
                print(f"{label:28s} {mode:6s} seed {seed}: ppl {summary['eval_ppl']:.2f} "
                      f"agree {summary.get('agreement', float('nan')):.4f}", flush=True)

    teacher_ppl = next(s["teacher_ppl"] for runs in results.values() for s in runs if s.get("teacher_ppl"))
    any_run = next(iter(results.values()))[0]
    cached = next((s["cache"] for runs in results.values() for s in runs if s.get("cache")), None)
    tokens = args.steps * args.batch_size * 128
    lines = [
        "# Causal-LM distillation on Python standard-library text",
        "",
        f"- command: `python benchmarks/lm_distill.py {shlex.join(sys.argv[1:])}`".rstrip(),
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; machine: {machine()}",
        f"- teacher: demo GPT-2, {next(s['teacher_params'] for r in results.values() for s in r if s.get('teacher_params')):,} "
        f"parameters, held-out perplexity **{teacher_ppl:.2f}**; student: GPT-2 2×96, {any_run['student_params']:,} "
        f"parameters, random init per seed",
        f"- budget per student: {args.steps} steps × {args.batch_size} sequences × 128 tokens = {tokens:,} tokens "
        f"(AdamW, lr 1e-3, cosine, 20 warm-up steps); seeds {args.seeds}; evaluation on "
        f"{any_run['eval_tokens']:,} held-out tokens (whole modules never seen in training)",
        f"- `cached` rows: top-{args.k} log-probs + tail mass per token"
        + (f", {cached['bytes_per_token']:.1f} bytes/token on disk" if cached else "")
        + "; the loss is taken between the (k+1)-bucket coarsenings of student and teacher. `sampled` row: "
        f"{args.k} tokens drawn per position from the teacher, unique ids with importance weights (Random "
        "Sampling KD, an unbiased estimate of forward KL), same bytes per token",
        f"- total wall time {(time.time() - t_start) / 60:.1f} min (runs reused from an earlier identical config "
        "count as 0)",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "| objective | teacher logits | held-out perplexity ↓ | next-token agreement with teacher ↑ | KL(teacher‖student) ↓ | s / run |",
        "|---|---|---|---|---|---|",
    ]
    for (label, mode), runs in results.items():
        lines.append(
            f"| {label} | {mode if label != 'CE only (no teacher)' else '—'} | {mean_std([r['eval_ppl'] for r in runs])} | "
            f"{mean_std([100 * r['agreement'] for r in runs if r.get('agreement') is not None])}% | "
            f"{mean_std([r['eval_kl'] for r in runs if r.get('eval_kl') is not None])} | "
            f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Agreement and KL for the CE-only row compare the "
              "from-scratch student with the teacher on the same held-out text."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    _plot(results, args.out.with_suffix(".png"), teacher_ppl)
    print("\n".join(lines))


def _plot(results, path: Path, teacher_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(dict.fromkeys(label for label, _ in results))
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    markers = {"dense": "o", "cached": "x", "sampled": "^"}
    for (label, mode), runs in results.items():
        x = [100 * r["agreement"] for r in runs if r.get("agreement") is not None]
        y = [r["eval_ppl"] for r in runs if r.get("agreement") is not None]
        ax.scatter(x, y, marker=markers.get(mode, "s"), color=colours[label], label=f"{label} ({mode})")
    ax.axhline(teacher_ppl, color="k", linestyle=":", label="teacher perplexity")
    ax.set(xlabel="next-token agreement with the teacher (%)", ylabel="held-out perplexity",
           title="students after the same budget (each point a seed)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
