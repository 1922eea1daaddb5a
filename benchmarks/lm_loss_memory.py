"""Peak memory and time of the generalized JSD over a large vocabulary: ours (chunked) vs TRL.

    python benchmarks/lm_loss_memory.py            # vocab 32,000 x seq 1,024 x batch 4 (~10 GB peak, 2-4 min)
    python benchmarks/lm_loss_memory.py --quick    # vocab 8,000 x seq 256 x batch 2, chunks of 128 (seconds)

Forward + backward of the token-level generalized JSD(beta = 0.5) of GKD on CPU, fp32, w.r.t.
the student logits (the teacher's are constants, as in GKD training), with the first eighth of
every sequence masked (-100, a prompt). Variants, each in a fresh child process:

* ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta)``.
* ``unchunked``: our ``losses.jsd`` on the whole batch (same algorithm, no chunking).
* ``chunked``: ``chunked_token_loss("jsd", ...)`` over ``--chunk-size`` tokens at a time.
* ``fused``: ``chunked_token_loss`` from the student's final hidden states (width
  ``--hidden``) and its LM head weight; the student logits never exist for the whole batch.

The student logits of the first three are ``hidden @ W.T`` for the same seeded ``hidden`` and
``W`` that the fused variant starts from, so all four compute the same value; the parent checks
that they agree (and that the student-logit gradients of the first three agree, by checksums).

Memory: each child allocates its inputs, resets its peak-RSS mark (``echo 5 >
/proc/self/clear_refs``) and reads VmRSS as the baseline; the loss's peak extra memory is
VmHWM after backward minus that baseline. It includes the gradient of the inputs (the size of
the student logits for the first three, of hidden states and W for ``fused``). tracemalloc
would not see torch's allocations; /proc does.

Writes benchmarks/results/lm_loss_memory.md (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("trl", "unchunked", "chunked", "fused")


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    extra = {}
    if args.child == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import trl
        from trl.experimental.gkd import GKDTrainer

        extra["trl_version"] = trl.__version__
    from distillery.losses.lm import chunked_token_loss
    from distillery.losses.logits import jsd

    def run(hidden, weight, student, teacher, labels, chunk_size):
        if args.child == "trl":
            loss = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=args.beta)
        elif args.child == "unchunked":
            loss = jsd(student, teacher, labels, beta=args.beta)
        elif args.child == "chunked":
            loss = chunked_token_loss("jsd", student, teacher, labels, chunk_size=chunk_size, beta=args.beta)
        else:
            loss = chunked_token_loss("jsd", hidden, teacher, labels, chunk_size=chunk_size, lm_head=weight, beta=args.beta)
        return loss

    # Warm-up on small tensors (large enough for the multi-threaded kernels): the first call
    # pages in library code and starts thread pools, which VmRSS counts; not the loss's memory.
    h, w = torch.randn(2, 64, 16, requires_grad=True), torch.randn(2048, 16, requires_grad=True)
    s = (h @ w.t()).detach().requires_grad_(True)
    run(h, w, s, torch.randn(2, 64, 2048), torch.randint(0, 2048, (2, 64)), 32).backward()
    del h, w, s

    B, T, V, H = args.batch, args.seq, args.vocab, args.hidden
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g).mul_(2.0 / H**0.5)  # student logits ~ N(0, 2^2)
    teacher = torch.randn(B, T, V, generator=g).mul_(2.0)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 8] = -100
    if args.child == "fused":
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    else:
        student = (hidden @ weight.t()).requires_grad_(True)
        del hidden, weight

    baseline_reset = _reset_peak()
    baseline = _status("VmRSS")
    hwm_before = _status("VmHWM")
    t0 = time.perf_counter()
    if args.child == "fused":
        loss = run(hidden, weight, None, teacher, labels, args.chunk_size)
    else:
        loss = run(None, None, student, teacher, labels, args.chunk_size)
    t_forward = time.perf_counter() - t0
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    out = {
        "variant": args.child,
        "value": float(loss.item()),
        "seconds": seconds,
        "forward_seconds": t_forward,
        "baseline_bytes": baseline,
        "peak_extra_bytes": peak - baseline,
        "peak_reset": baseline_reset,
        "hwm_before_loss": hwm_before,
        **extra,
    }
    if args.child != "fused":  # gradient checksums (computed after the peak was read)
        grad = student.grad
        probe = torch.randn(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out["grad_sq"] = float(sum((row.double() ** 2).sum() for row in grad.reshape(-1, V)))
        out["grad_dot"] = float(sum((row.double() @ probe) for row in grad.reshape(-1, V)))
    return out


def run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab), "--seq", str(args.seq),
           "--batch", str(args.batch), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
           "--beta", str(args.beta), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="vocab 8,000 x seq 256 x batch 2")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256, help="student hidden size (fused variant; defines the logits)")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm_loss_memory.md")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.vocab, args.seq, args.batch = 8_000, 256, 2
        args.chunk_size = min(args.chunk_size, 128)

    import torch

    t_start = time.perf_counter()
    results = {}
    for variant in args.variants.split(","):
        results[variant] = res = run_child(variant, args)
        print(variant, json.dumps({k: v for k, v in res.items() if k != "error"}), res.get("error", ""), flush=True)

    ok = {k: r for k, r in results.items() if "error" not in r}
    reference = ok.get("trl") or ok.get("unchunked")
    checks = []
    if reference is not None:
        for name, r in ok.items():
            rel = abs(r["value"] - reference["value"]) / abs(reference["value"])
            line = f"{name}: value rel. diff {rel:.1e}"
            good = rel < 1e-5
            if "grad_sq" in r and "grad_sq" in reference:
                rel_sq = abs(r["grad_sq"] - reference["grad_sq"]) / abs(reference["grad_sq"])
                rel_dot = abs(r["grad_dot"] - reference["grad_dot"]) / (abs(reference["grad_dot"]) + 1e-30)
                line += f", grad checksums rel. diff {rel_sq:.1e} / {rel_dot:.1e}"
                good = good and rel_sq < 1e-4 and rel_dot < 1e-3
            checks.append((name, good, line))
    all_equal = bool(checks) and all(good for _, good, _ in checks)

    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    ram = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    n_tokens = args.batch * args.seq
    logit_bytes = n_tokens * args.vocab * 4
    command = "python benchmarks/lm_loss_memory.py" + (" --quick" if args.quick else "")
    defaults = {"--chunk-size": (args.chunk_size, 128 if args.quick else 512), "--hidden": (args.hidden, 256), "--beta": (args.beta, 0.5)}
    command += "".join(f" {k} {v}" for k, (v, d) in defaults.items() if v != d)
    trl_version = ok.get("trl", {}).get("trl_version", "not run")
    lines = [
        "# Generalized JSD over a large vocabulary: peak memory and time, ours vs TRL",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, {ram / 2**30:.1f} GiB RAM, "
        f"torch {torch.__version__} ({args.threads} threads), TRL {trl_version}, Python {platform.python_version()}, no GPU; "
        f"load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores: times are indicative)",
        f"- Size: batch {args.batch} x seq {args.seq} x vocab {args.vocab:,}, fp32; the first {args.seq // 8} positions of "
        f"every sequence are masked (-100), so {n_tokens - args.batch * (args.seq // 8):,} of {n_tokens:,} tokens are scored. "
        f"One (batch, seq, vocab) fp32 tensor is {gb(logit_bytes)}.",
        f"- Loss: generalized JSD, beta = {args.beta}, T = 1 (TRL's convention: beta weights the teacher in the mixture; "
        "mean over scored tokens), forward + backward w.r.t. the student (logits, or hidden states and LM-head weight "
        "for `fused`, hidden size " + str(args.hidden) + "); teacher logits are constants. "
        f"Chunked variants: {args.chunk_size} tokens per chunk.",
        "- Peak extra memory = VmHWM after backward minus VmRSS once the inputs exist (peak mark reset there), "
        "in a fresh process per variant; it includes the inputs' gradient.",
        "",
        "| variant | loss value | fwd + bwd time (s) | peak extra memory | vs TRL |",
        "|---|---|---|---|---|",
    ]
    labels = {"trl": "TRL `GKDTrainer.generalized_jsd_loss`", "unchunked": "ours, `jsd` unchunked",
              "chunked": "ours, `chunked_token_loss('jsd')`", "fused": "ours, fused with the LM head"}
    trl_peak = ok.get("trl", {}).get("peak_extra_bytes")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {labels[name]} | failed | | | |")
            continue
        ratio = f"{r['peak_extra_bytes'] / trl_peak:.2f}x" if trl_peak else "-"
        lines.append(f"| {labels[name]} | {r['value']:.6f} | {r['seconds']:.1f} | {gb(r['peak_extra_bytes'])} | {ratio} |")
    lines += ["", "Equality (same run; reference: " + ("TRL" if "trl" in ok else "ours unchunked") + "):", ""]
    lines += [f"- {'ok' if good else 'MISMATCH'}: {line}" for _, good, line in checks]
    chunked = ok.get("chunked")
    if trl_peak and chunked:
        ratio = chunked["peak_extra_bytes"] / trl_peak
        lines += ["", f"Goal (same values, chunked peak <= 0.3x TRL's): values {'equal' if all_equal else 'DIFFER'}, "
                  f"peak {ratio:.2f}x -> {'met' if all_equal and ratio <= 0.3 else 'NOT met'}."]
    lines += ["", "The `fused` row starts from hidden states and the LM-head weight, not from logits, so its baseline holds no "
              "(batch, seq, vocab) tensor at all; in a real model the other rows would also pay for the LM head's full "
              "logits and their gradient. Its value is compared with the others (same logits, computed per chunk).",
              "", f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s."]
    for name, r in results.items():
        if "error" in r:
            lines += ["", f"`{name}` failed:", "", "```", r["error"], "```"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
