"""AutoDistil at reduced scale: searched student vs a hand-picked student of the same parameter budget.

    python benchmarks/autodistil.py                 # reduced run (the defaults below): 4.4 CPU-min, 12-19 min wall on the shared 2 cores
    python benchmarks/autodistil.py --steps 100 --max-length 48 --val 500 --heldout 2000   # the config's own settings

1. ``run_autodistil`` on ``configs/encoder/autodistil.yaml`` (K=2 sub-spaces under the packaged
   all-MiniLM-L6-v2; --steps / --max-length / --val / --heldout override the config).
2. The budget ``le-2block`` is the parameter count of the hand-picked student: ``lm/encoder.py``'s
   ``build_student(teacher, 2)`` -- the teacher's width with teacher blocks [0, 5] (15.6M parameters).
3. Both students, first with their inherited/copied weights, then after the same short distillation
   (``--finetune-steps`` steps of the same self-attention objective, same data, lr and batch), are
   compared on held-out WordNet glosses: mean teacher-student embedding cosine (only defined when the
   widths are equal) and top-10 retrieval agreement (any width).

Writes benchmarks/results/autodistil.md and autodistil.png; never edit the results by hand.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "encoder" / "autodistil.yaml")
    ap.add_argument("--steps", type=int, default=50, help="super-network steps per sub-space (config: 100)")
    ap.add_argument("--finetune-steps", type=int, default=50, help="steps of the short distillation of both students")
    ap.add_argument("--max-length", type=int, default=32, help="tokens per gloss (config: 48)")
    ap.add_argument("--val", type=int, default=300, help="validation glosses that score the candidates (config: 500)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out glosses for the metrics (config: 2000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "autodistil.md")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from distillery.lm.encoder import build_student, evaluate_encoder, sentence_embeddings
    from distillery.search.autodistil import fixed_batches, heldout_loss, split_texts, teacher_qkv, train_supernet
    from distillery.search.autodistil_config import SubSpace, load_autodistil_config
    from distillery.search.supernet import Arch, SuperBert, bert_config, count_macs, count_params, export_bert

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="autodistil_bench_"))
    cfg = load_autodistil_config(args.config, [f"output_dir={tmp}", f"steps_per_subspace={args.steps}",
                                               f"max_length={args.max_length}", f"n_val={args.val}",
                                               f"n_heldout={args.heldout}"])
    print(f"[{time.perf_counter() - started:5.0f}s] AutoDistil search ...", flush=True)
    from distillery.search.autodistil import run_autodistil

    summary = run_autodistil(cfg, progress=False)
    print(f"[{time.perf_counter() - started:5.0f}s] search done", flush=True)

    teacher = AutoModel.from_pretrained(cfg.teacher).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(cfg.teacher)
    train_texts, val_texts, heldout = split_texts(cfg)
    t_emb = sentence_embeddings(teacher, tok, heldout, max_length=cfg.max_length)
    relation_heads = summary["relation_heads"]
    val_batches = fixed_batches(tok, val_texts, cfg.max_length)
    val_qkv = teacher_qkv(teacher, val_batches)

    def as_supernet(model, arch: Arch) -> SuperBert:
        net = SuperBert(bert_config(teacher.config, arch))
        net.load_state_dict(model.state_dict(), strict=True)  # identical parameter names (BertModel's)
        return net.eval()

    def metrics(model, arch: Arch) -> dict:
        """Held-out embedding fidelity, plus the search's score (validation distillation loss)."""
        m = evaluate_encoder(teacher, model, tok, heldout, k=10, max_length=cfg.max_length, teacher_embeddings=t_emb)
        m["val_loss"] = heldout_loss(as_supernet(model, arch), arch, val_batches, val_qkv, relation_heads=relation_heads,
                                     weights=cfg.relation_weights)
        return m

    def finetune(model, arch: Arch) -> tuple[object, float]:
        """The same short distillation for either student: a one-member sub-space, AutoDistil's loss."""
        net = as_supernet(model, arch)
        space = SubSpace(name="fixed", layers=[arch.layers], hidden=[arch.hidden], heads=[arch.heads], ffn=[arch.ffn])
        ft = cfg.model_copy(update={"steps_per_subspace": args.finetune_steps, "n_random": 0})
        stats = train_supernet(net, teacher, tok, train_texts, space, ft, relation_heads)
        return export_bert(net, arch), stats["time_s"]

    budget = next(b for b in summary["budgets"] if b["name"] == "le-2block")
    best = budget["best"]
    searched_arch = Arch(best["layers"], best["hidden"], best["heads"], best["ffn"])
    searched = AutoModel.from_pretrained(budget["student_dir"]).eval()
    hand_arch = Arch(2, teacher.config.hidden_size, teacher.config.num_attention_heads, teacher.config.intermediate_size)
    hand = build_student(teacher, 2).eval()
    assert sum(p.numel() for p in hand.parameters()) == count_params(teacher.config, hand_arch)

    rows = []
    for label, model, arch in (("searched (AutoDistil)", searched, searched_arch), ("hand-picked (2 teacher blocks)", hand, hand_arch)):
        print(f"[{time.perf_counter() - started:5.0f}s] {label}: evaluate, fine-tune, evaluate ...", flush=True)
        before = metrics(model, arch)
        tuned, secs = finetune(model, arch)
        after = metrics(tuned, arch)
        rows.append((label, arch, before, after, secs))

    total = time.perf_counter() - started
    shutil.copy(summary["files"]["plot"], args.out.with_suffix(".png"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def cos(m: dict) -> str:
        return "— (other width)" if m["cosine"] is None else f"{m['cosine']:.4f}"

    t = summary["teacher"]
    lines = [
        "# AutoDistil (reduced scale): searched vs hand-picked student under the same parameter budget", "",
        f"- Command: `python benchmarks/{Path(sys.argv[0]).name}{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; total wall time {total / 60:.1f} min, of which this "
        f"process had {time.process_time() / 60:.1f} min of CPU (the rest is waiting for the shared cores); the "
        f"search alone (train + score + export) {summary['wall_time_s'] / 60:.1f} min wall",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPU cores, {args.threads} torch thread(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, no GPU; load "
        f"average at the end {load:.1f}: other agents share the 2 cores, so wall times are under contention and indicative only.",
        f"- Teacher: all-MiniLM-L6-v2 (packaged), {t['layers']} layers, hidden {t['hidden']}, {t['heads']} heads, "
        f"ffn {t['ffn']}, {t['params'] / 1e6:.1f}M parameters.",
        f"- Config: `{args.config.relative_to(ROOT)}` with steps_per_subspace={args.steps}, max_length={args.max_length}, "
        f"n_val={args.val}, n_heldout={args.heldout}; sandwich = largest + smallest + {cfg.n_random} random per step, "
        f"batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, token-embedding table frozen, seed {cfg.seed}.",
        f"- Objective (super-networks, search score and the short distillation): MiniLM attention distributions (Q-K) + "
        f"value relation (V-V), teacher's last block vs the student's last, {relation_heads} relation heads.",
        f"- Data: WordNet 3.0 glosses, {summary['data']['train']:,} train / {summary['data']['val']:,} validation "
        f"(search) / {summary['data']['heldout']:,} held-out (metrics). One seed.",
        "",
        "## Search (inherited weights, validation loss)", "",
        "| sub-space | best architecture | params | MACs/seq | val loss |",
        "|---|---|---|---|---|",
    ]
    for s in summary["subspaces"]:
        b = s["best"]
        lines.append(f"| {s['name']} ({s['n_scored']} candidates, {s['train']['time_s']:.0f} s training) | `{b['arch']}` | "
                     f"{b['params']:,} | {b['macs']:,} | {b['val_loss']:.4f} |")
    lines += ["", "| budget | best architecture | params | val loss | held-out top-10 agreement |", "|---|---|---|---|---|"]
    for b in summary["budgets"]:
        if b["best"] is None:
            lines.append(f"| {b['name']} (≤ {b['max_params']:,}) | none fits | | | |")
        else:
            lines.append(f"| {b['name']} (≤ {b['max_params']:,}) | `{b['best']['arch']}` | {b['best']['params']:,} | "
                         f"{b['best']['val_loss']:.4f} | {b['heldout']['top10_agreement']:.4f} |")
    lines += ["", f"## Same budget (≤ {budget['max_params']:,} parameters): searched vs hand-picked", "",
              "| student | architecture | params | MACs/seq | inherited: val loss | cosine | top-10 | "
              f"after {args.finetune_steps} steps: val loss | cosine | top-10 | fine-tune time (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, arch, before, after, secs in rows:
        lines.append(f"| {label} | `{arch.key}` | {count_params(teacher.config, arch):,} | {count_macs(arch, cfg.max_length):,} | "
                     f"{before['val_loss']:.4f} | {cos(before)} | {before['top10_agreement']:.4f} | "
                     f"{after['val_loss']:.4f} | {cos(after)} | {after['top10_agreement']:.4f} | {secs:.0f} |")
    lines += ["", "val loss = the search's score (self-attention distillation loss on the validation glosses, lower is "
              "better); the hand-picked student lies outside both sub-spaces, so the search never scored it. Cosine compares sentence embeddings directly, so it exists only for students of the teacher's width; "
              "top-10 agreement compares neighbour lists and works for any width. Parameters include the token-embedding "
              "table (30,522 x hidden), which dominates at this size: narrower students buy depth with it.",
              "Loss vs parameters of every candidate: `autodistil.png`.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
