"""Sparse teacher caches for causal-LM distillation: bytes on disk vs bias of the loss.

    python benchmarks/lm_cache.py                                  # runs/lm/teacher, runs/lm/student-init
    python benchmarks/lm_cache.py --teacher DIR --student DIR      # any HF causal LMs sharing a tokenizer
    python benchmarks/lm_cache.py --quick                          # 4 sequences instead of 32

For held-out text (``--text-glob``, default: the standard library's ``json/*.py``), cut into
``--seq-len``-token blocks, the teacher's next-token distributions are stored with
``distillery.lm.cache.build_token_cache`` (top-k with k in ``--ks``, and Random Sampling KD with
the same k) and read back with ``TokenCache.batch``. For every scheme the sparse loss of the
(untrained) student on those blocks is compared with the dense forward KL(teacher || student):

* bytes / token: the store's on-disk size over its stored tokens (``TokenCache.bytes_per_token``);
* value rel. error: |sparse - dense| / dense per sequence, averaged over the sequences;
* grad cosine: cosine similarity of the gradient w.r.t. the student logits (the whole
  sequence, flattened) with the dense one, averaged over the sequences.

top-k is deterministic: its errors are its bias. A sampled store is one random draw per token,
so its single-draw numbers mix bias and variance; the columns "mean of R draws" average the
loss and gradient over ``--draws`` independent draws (in memory, values rounded to float16 as in
the store), where an unbiased estimator's error shrinks like 1/sqrt(R) and a biased one's does
not. The sampled value needs the teacher's log-probabilities at the sampled ids, which the store
does not keep (training needs only ids and weights): they are gathered from the dense teacher.

Writes benchmarks/results/lm_cache.md (or --out).
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import shlex
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_TEACHER, DEFAULT_STUDENT = ROOT / "runs/lm/teacher", ROOT / "runs/lm/student-init"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, help=f"HF causal-LM directory with a tokenizer (default {DEFAULT_TEACHER})")
    p.add_argument("--student", type=Path, help=f"HF causal-LM directory (default {DEFAULT_STUDENT})")
    p.add_argument("--text-glob", default=os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py"))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-seqs", type=int, default=None, help="sequences to average over (default 32, --quick 4)")
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--draws", type=int, default=8, help="independent draws for the sampled 'mean of R draws' columns")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "lm_cache.md")
    args = p.parse_args()
    args.n_seqs = args.n_seqs or (4 if args.quick else 32)
    return args


def resolve_models(args: argparse.Namespace) -> tuple[Path, Path]:
    teacher, student = args.teacher or DEFAULT_TEACHER, args.student or DEFAULT_STUDENT
    missing = [str(p) for p in (teacher, student) if not p.is_dir()]
    if missing:
        sys.exit(f"lm_cache benchmark: model directory not found: {', '.join(missing)}.\n"
                 "Create the demo teacher and student with `distillery lm demo` (it writes runs/lm/teacher and "
                 "runs/lm/student-init), or pass --teacher DIR --student DIR (Hugging Face causal-LM directories, "
                 "the teacher's with a tokenizer).")
    return teacher, student


def blocks(tokenizer, pattern: str, seq_len: int, n: int) -> tuple[list[list[int]], list[str]]:
    files = sorted(glob.glob(pattern))
    if not files:
        sys.exit(f"lm_cache benchmark: no file matches --text-glob {pattern!r}")
    ids = tokenizer("\n".join(Path(f).read_text(encoding="utf-8") for f in files))["input_ids"]
    available = len(ids) // seq_len
    if available < n:
        sys.exit(f"lm_cache benchmark: {len(ids):,} tokens give {available} blocks of {seq_len}, fewer than --n-seqs {n}")
    step = available // n  # spread the blocks over the whole text
    return [ids[i * step * seq_len:(i * step + 1) * seq_len] for i in range(n)], files


def main() -> None:
    args = parse_args()
    teacher_dir, student_dir = resolve_models(args)
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillery.lm.cache import TokenCache, build_token_cache
    from distillery.losses.lm_sparse import sampled_kl, sparsify_sample, topk_kl
    from distillery.losses.logits import forward_kl

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    vocab = len(tokenizer)
    seqs, files = blocks(tokenizer, args.text_glob, args.seq_len, args.n_seqs)
    with torch.inference_mode():
        t_logits = torch.stack([teacher(input_ids=torch.tensor([s])).logits[0, :, :vocab].float() for s in seqs])
        s_logits = torch.stack([student(input_ids=torch.tensor([s])).logits[0, :, :vocab].float() for s in seqs])
    s_logits = s_logits.clone()  # out of inference mode: autograd may use it

    def value_and_grad(loss_fn, n):
        s = s_logits[n].clone().requires_grad_()
        loss = loss_fn(s)
        loss.backward()
        return loss.item(), s.grad.flatten()

    dense = [value_and_grad(lambda s, n=n: forward_kl(s, t_logits[n]), n) for n in range(len(seqs))]
    t_logp = torch.log_softmax(t_logits, -1)

    def compare(per_seq):  # [(value, grad)] -> mean rel. error of the value, mean gradient cosine
        rel = [abs(v - dv) / dv for (v, _), (dv, _) in zip(per_seq, dense)]
        cos = [torch.nn.functional.cosine_similarity(g, dg, dim=0).item() for (_, g), (_, dg) in zip(per_seq, dense)]
        return sum(rel) / len(rel), sum(cos) / len(cos)

    examples = [{"input_ids": s} for s in seqs]
    rows, ks = [], [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("topk", "sample"):
            for k in ks:
                path = build_token_cache(teacher, examples, Path(tmp) / f"{scheme}{k}", scheme=scheme, k=k,
                                         fingerprint={}, vocab_size=vocab, progress=False)
                store = TokenCache.open(path)
                b = store.batch(range(len(seqs)), args.seq_len)
                if scheme == "topk":
                    for tail in (True, False):
                        per_seq = [value_and_grad(lambda s, n=n: topk_kl(s, b["ids"][n], b["values"][n], tail=tail), n)
                                   for n in range(len(seqs))]
                        rows.append((f"top-k{' + tail' if tail else ''}", k, store.bytes_per_token, *compare(per_seq),
                                     None, None, None))
                    continue
                lp = t_logp.gather(-1, b["ids"])
                one = [value_and_grad(lambda s, n=n: sampled_kl(s, b["ids"][n], b["values"][n],
                                                                teacher_logprobs=lp[n]), n) for n in range(len(seqs))]
                filled = (b["values"] > 0).float().sum(-1).mean().item()
                # R more independent draws (other seeds), stored precision, averaged per sequence
                averaged = []
                for n in range(len(seqs)):
                    draws = []
                    for r in range(args.draws):
                        ids, w = sparsify_sample(t_logits[n], k, torch.Generator().manual_seed(1000 + r))
                        w = w.half().float()
                        draws.append(value_and_grad(lambda s, n=n, ids=ids, w=w: sampled_kl(
                            s, ids, w, teacher_logprobs=t_logp[n].gather(-1, ids)), n))
                    averaged.append((sum(v for v, _ in draws) / len(draws), sum(g for _, g in draws) / len(draws)))
                rows.append(("sampled (RS-KD)", k, store.bytes_per_token, *compare(one), *compare(averaged), filled))
    write_report(args, rows, dense, teacher_dir, student_dir, teacher, student, vocab, files, len(seqs),
                 time.perf_counter() - t_start, versions=(torch.__version__, transformers.__version__, datasets.__version__))


def write_report(args, rows, dense, teacher_dir, student_dir, teacher, student, vocab, files, n_seqs, seconds, versions):
    torch_v, transformers_v, datasets_v = versions
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor() or "?")
    ram = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    command = shlex.join(["python", "benchmarks/lm_cache.py", *sys.argv[1:]])
    dense_kl = sum(v for v, _ in dense) / len(dense)
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "# Sparse teacher caches for LM distillation: bytes on disk vs bias of the loss",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time {seconds:.0f} s",
        f"- Machine: {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, {ram / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch_v} "
        f"({args.threads} threads), transformers {transformers_v}, datasets {datasets_v}",
        f"- Teacher: `{teacher_dir}` ({type(teacher).__name__}, {n_params(teacher) / 1e6:.2f}M parameters); "
        f"student: `{student_dir}` ({type(student).__name__}, {n_params(student) / 1e6:.2f}M parameters); "
        f"vocabulary {vocab:,} (the tokenizer's)",
        f"- Text (held out): {len(files)} files matching `{args.text_glob}`; {n_seqs} blocks of {args.seq_len} tokens "
        f"spread over it. Dense forward KL(teacher || student) on them: {dense_kl:.4f} nats/token (mean over blocks), T = 1.",
        "- Stores: ids int32 + values float16 per slot (`distillery.lm.cache`). Dense float16 logits would take "
        f"{2 * vocab:,} bytes / token. Sampled value: sum_j w_j (log p_j - log q_j) with log p_j gathered from the "
        "dense teacher at the sampled ids (the store keeps ids and weights only; training needs no more).",
        "",
        "| scheme | k | bytes / token | value rel. error | grad cosine | value rel. error, mean of "
        f"{args.draws} draws | grad cosine, mean of {args.draws} draws | filled slots / token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, k, bpt, rel, cos, rel_r, cos_r, filled in rows:
        lines.append(f"| {name} | {k} | {bpt:.1f} | {rel:.4f} | {cos:.4f} | {fmt(rel_r, '.4f')} | {fmt(cos_r, '.4f')} | "
                     f"{fmt(filled, '.1f')} |")
    lines += [
        "",
        "Reading the table: top-k + tail is the KL of the two distributions coarsened to k + 1 buckets, so it "
        "under-estimates the dense KL (it cannot see how the tail mass is spread) and its gradient only rescales "
        "the student's tail as a whole, with no signal about how the teacher spreads that mass; without the tail the value is a truncated sum and the gradient pulls the "
        "student's tail mass towards 0. The two top-k gradients (w.r.t. logit j, student probabilities q) are q_j - p_j with the tail vs (1 - p_tail) q_j - p_j without on the k ids, and q_j (1 - p_tail / q_tail) vs q_j (1 - p_tail) outside them: nearly equal while the student's mass outside the teacher's top k is close to 1 (an untrained student), increasingly different as it learns. A sampled store is one draw per token: its error is mostly variance, which "
        "the mean over draws shrinks (unbiased: Anshumann et al., 2025). \"filled slots\" counts the unique sampled "
        "ids; the other slots are padding (weight 0) that the fixed-width store still pays for.",
        "",
        "Generated by `benchmarks/lm_cache.py`; do not edit by hand.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
