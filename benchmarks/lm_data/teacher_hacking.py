"""Teacher hacking on the offline demo: offline (fixed teacher text, many epochs) vs online data.

    python benchmarks/lm_data/teacher_hacking.py            # full: 2 seeds, ~6 min on one core
    python benchmarks/lm_data/teacher_hacking.py --quick    # smoke: 1 seed, a few steps

Tiapkin et al. (2025), "On Teacher Hacking in Language Model Distillation", controlled setup:

* oracle  = the demo teacher ``runs/lm/teacher`` (GPT-2 4x192), the "true" distribution;
* teacher = a GPT-2 2x128 distilled briefly from the oracle (forward KL), so it is an imperfect
  copy: KL(oracle || teacher) is clearly above 0;
* student = GPT-2 2x96, random init per seed, distilled from the *teacher* with forward KL on the
  same prompts (the first 32 tokens of a few dozen standard-library blocks) in two regimes:

  - **offline**: the teacher continues every prompt once (``seqkd``, greedy) and the student is
    trained on that fixed set for many epochs -- the paper's fixed offline dataset;
  - **online**: each step the student writes fresh continuations of the prompts and the teacher
    scores them (``onpolicy.lmbda: 1``) -- the paper's on-policy online generation.

The oracle monitor (``distillery.lm.oracle``) measures on held-out text (``asyncio`` modules,
never trained on) the golden metric KL(oracle || student) and the proxy KL(teacher || student);
the training loss is the proxy on the training sequences.  Runs are reused when their config is
unchanged (``benchmarks/runs/lm_data/teacher_hacking/``).
"""
from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ORACLE = "runs/lm/teacher"
TEACHER_SHAPE = dict(n_layer=2, n_embd=128, n_head=2)
PROMPTS = 32        # training prompts (blocks) shared by both regimes
BLOCK = 64          # tokens per block; the first 32 are the prompt
NEW_TOKENS = 32


def _budget(quick: bool) -> dict:
    if quick:
        return dict(teacher_steps=3, steps=8, every=4, seeds=[0], eval_blocks=8)
    return dict(teacher_steps=60, steps=240, every=20, seeds=[0, 1], eval_blocks=32)


def _run(raw: dict, splits=None) -> dict:
    """distill_lm, or the summary of a finished run with the same config (resumed if interrupted)."""
    from distillery.lm.config import dump_lm_config, lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    cfg = lm_config_from_dict(raw)
    run_dir = Path(cfg.output_dir) / cfg.name
    same = (run_dir / "config.yaml").is_file() and (run_dir / "config.yaml").read_text() == dump_lm_config(cfg)
    if same and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    resume = same and (run_dir / "checkpoints").is_dir()
    return distill_lm(cfg, resume=resume, overwrite=not resume, splits=splits).summary


def _teacher(root: Path, b: dict) -> Path:
    """The imperfect teacher: GPT-2 2x128 distilled from the oracle for a short budget."""
    from distillery.lm.demo import demo_config, init_model

    init = init_model(root / "teacher-init", REPO / "runs/lm/tokenizer", TEACHER_SHAPE, seed=0)
    raw = demo_config("teacher", teacher=ORACLE, student=str(init), objective="forward_kl",
                      steps=b["teacher_steps"], root=root,
                      train={"progress": False, "warmup_steps": min(20, b["teacher_steps"])})
    _run(raw)
    return root / "teacher" / "student"


def _splits(b: dict):
    """The fixed prompt set (first blocks of json/*.py) and held-out text (asyncio/*.py)."""
    from distillery.lm import data as lmdata
    from distillery.lm.config import LMData, LMModel
    from distillery.lm.models import load_tokenizer

    tok = load_tokenizer(LMModel(path=ORACLE))
    spec = LMData(source="stdlib:json/*.py", block_size=BLOCK, eval_source="stdlib:asyncio/*.py",
                  max_eval_blocks=b["eval_blocks"])
    splits = lmdata.load_splits(spec, tok)
    cols = ["input_ids", "targets", "prompt_len"]
    train = splits.train.with_format(None).select(range(PROMPTS)).with_format("torch", columns=cols)
    return lmdata.LMSplits(train, splits.eval, splits.n_documents)


def _student_raw(name: str, regime: str, seed: int, teacher: Path, root: Path, b: dict) -> dict:
    from distillery.lm.demo import demo_config

    sections = {"offline": {"seqkd": {"enabled": True, "prompt_length": 32, "max_new_tokens": NEW_TOKENS}},
                "online": {"onpolicy": {"lmbda": 1.0, "prompt_length": 32, "max_new_tokens": NEW_TOKENS}}}[regime]
    raw = demo_config(name, teacher=str(teacher), student="runs/lm/student-init", objective="forward_kl",
                      steps=b["steps"], root=root,
                      data={"source": "stdlib:json/*.py", "block_size": BLOCK, "eval_source": "stdlib:asyncio/*.py",
                            "max_eval_blocks": b["eval_blocks"]},
                      train={"seed": seed, "batch_size": 8, "progress": False, "checkpoint_every": 0,
                             "scheduler": "constant", "warmup_steps": 10},
                      monitor={"oracle": ORACLE, "every": b["every"], "max_batches": b["eval_blocks"] // 8},
                      **sections)
    raw["student"]["init"] = "random"  # fresh weights per seed (set_seed(train.seed) before building)
    return raw


def _timing(root: Path, fresh: bool, wall: float, cpu: float) -> tuple[float, float]:
    """Wall and CPU time of the run that computed the results (kept when a rerun reuses them)."""
    path = root / "timing.json"
    if fresh or not path.is_file():
        path.write_text(json.dumps({"wall": wall, "cpu": cpu}))
        return wall, cpu
    saved = json.loads(path.read_text())
    return saved["wall"], saved["cpu"]


def _curves(run_dir: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mon = [r for r in rows if "oracle_kl" in r]
    train = [r for r in rows if "eval_ppl" not in r]
    return {"step": [r["step"] for r in mon], "oracle_kl": [r["oracle_kl"] for r in mon],
            "teacher_kl": [r["teacher_kl"] for r in mon],
            "train_step": [r["step"] for r in train], "train_loss": [r["loss"] for r in train]}


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run(quick: bool, out_dir: Path) -> str:
    import os

    torch.set_num_threads(1)
    os.chdir(REPO)  # the configs name runs/lm/... and benchmarks/runs/... relative to the repository
    b = _budget(quick)
    root = Path("benchmarks/runs/lm_data") / ("teacher_hacking-quick" if quick else "teacher_hacking")
    t0, cpu0 = time.time(), time.process_time()
    fresh = not (root / "online-s1" / "summary.json").is_file() or quick  # else every run is reused
    teacher = _teacher(root, b)
    splits = _splits(b)
    results: dict[str, list[tuple[dict, dict]]] = {"offline": [], "online": []}
    for regime in results:
        for seed in b["seeds"]:
            name = f"{regime}-s{seed}"
            summary = _run(_student_raw(name, regime, seed, teacher, root, b), splits=splits)
            results[regime].append((summary, _curves(root / name)))
            o = summary["oracle"]
            print(f"{name}: oracle_kl min {o['oracle_kl_min']:.3f}@{o['oracle_kl_min_step']} final "
                  f"{o['oracle_kl_final']:.3f}, teacher_kl final {o['teacher_kl_final']:.3f}, "
                  f"hacking {o['hacking_signal']:.3f}", flush=True)
    wall, cpu = _timing(root, fresh, time.time() - t0, time.process_time() - cpu0)
    floor = results["offline"][0][0]["oracle"]["oracle_teacher_kl"]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = "teacher_hacking-quick.png" if quick else "teacher_hacking.png"
    _plot(results, floor, out_dir / png)

    lines = [
        "## Teacher hacking: offline vs online data (Tiapkin et al., 2025)", "",
        f"Oracle `runs/lm/teacher` (GPT-2 4×192); teacher GPT-2 2×128 distilled from it for {b['teacher_steps']} "
        f"steps × 16 × 128 tokens (held-out KL(oracle‖teacher) = {floor:.3f} nats/token); student GPT-2 2×96, "
        f"random init, forward KL from the teacher for {b['steps']} steps × 8 sequences on the same {PROMPTS} prompts "
        f"(first 32 tokens of 64-token `json/*.py` blocks) with {NEW_TOKENS}-token continuations: **offline** = one "
        f"greedy teacher continuation per prompt, reused ({b['steps'] * 8 // PROMPTS} epochs), **online** = fresh "
        f"student samples every step (GKD, λ = 1); golden KL(oracle‖student) and proxy KL(teacher‖student) "
        f"per token on {b['eval_blocks']} held-out 64-token `asyncio/*.py` blocks every {b['every']} steps; "
        f"seeds {b['seeds']}; {cpu / 60:.1f} min CPU, {wall / 60:.1f} min wall on one thread (the 2 cores were shared "
        "with other jobs).", "",
        "| regime | golden KL(oracle‖student) min (step) | golden final | proxy KL(teacher‖student) final "
        "| train loss (proxy on train data) final | hacking signal | seeds flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for regime, runs in results.items():
        o = [s["oracle"] for s, _ in runs]
        steps = "/".join(str(x["oracle_kl_min_step"]) for x in o)
        lines.append(
            f"| {regime} | {_ms([x['oracle_kl_min'] for x in o])} ({steps}) | {_ms([x['oracle_kl_final'] for x in o])} | "
            f"{_ms([x['teacher_kl_final'] for x in o])} | {_ms([c['train_loss'][-1] for _, c in runs])} | "
            f"{_ms([x['hacking_signal'] for x in o])} | {sum(x['teacher_hacking'] for x in o)}/{len(o)} |")
    lines += ["", f"![golden and proxy metrics vs step](lm_data/{png})", "", _reading(results, floor), ""]
    return "\n".join(lines)


def _reading(results: dict, floor: float) -> str:
    """The numbers in words (computed, so that the text cannot contradict the table)."""
    parts = []
    for regime, runs in results.items():
        o = [s["oracle"] for s, _ in runs]
        rise = statistics.mean(x["oracle_kl_final"] - x["oracle_kl_min"] for x in o)
        proxy_rise = statistics.mean(c["teacher_kl"][-1] - min(c["teacher_kl"]) for _, c in runs)
        flagged = sum(x["teacher_hacking"] for x in o)
        parts.append(f"**{regime}**: the golden metric ends {rise:.3f} nats/token above its minimum and the held-out "
                     f"proxy {proxy_rise:.3f} above its own (means over seeds); the monitor flags teacher hacking in "
                     f"{flagged}/{len(o)} seeds")
    final = {k: statistics.mean(s["oracle"]["oracle_kl_final"] for s, _ in v) for k, v in results.items()}
    gap = {k: statistics.mean(c["train_loss"][-1] for _, c in v) for k, v in results.items()}
    proxy = {k: statistics.mean(s["oracle"]["teacher_kl_final"] for s, _ in v) for k, v in results.items()}
    return ("Reading: " + "; ".join(parts) + f". Online data ends {final['offline'] - final['online']:+.3f} nats/token "
            f"closer to the oracle than offline data (golden floor KL(oracle‖teacher) = {floor:.3f}). Offline, the "
            f"training loss falls to {gap['offline']:.3f} while the held-out proxy stays at {proxy['offline']:.3f}: the "
            "student fits the fixed teacher text far better than it imitates the teacher elsewhere. A student smaller "
            "than its teacher and starting from random weights approaches the oracle only through the teacher, so "
            "its golden metric falls towards the floor with the proxy; a rise while the held-out proxy also rises "
            "would be over-fitting, which the monitor does not call hacking. Tiny models, one small corpus, 2 seeds: "
            "a demonstration of the measurement, not a replication of the paper's scale.")


def _plot(results: dict, floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (regime, runs) in zip(axes, results.items()):
        for i, (_, c) in enumerate(runs):
            ax.plot(c["step"], c["oracle_kl"], color="tab:red", alpha=0.9 - 0.3 * i,
                    label="golden KL(oracle‖student), held-out" if i == 0 else None)
            ax.plot(c["step"], c["teacher_kl"], color="tab:blue", linestyle="--", alpha=0.9 - 0.3 * i,
                    label="proxy KL(teacher‖student), held-out" if i == 0 else None)
            ax.plot(c["train_step"], c["train_loss"], color="tab:gray", linestyle=":", alpha=0.9 - 0.3 * i,
                    label="training loss (proxy on train data)" if i == 0 else None)
        ax.axhline(floor, color="k", linewidth=0.8, label="KL(oracle‖teacher)")
        ax.set(title=f"{regime} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", xlabel="step",
               ylabel="nats / token")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from distillery.report.metrics import machine_description

    quick = "--quick" in sys.argv
    out = HERE.parent / "results" / "lm_data"
    section = run(quick=quick, out_dir=out)
    header = (f"_Command: `python benchmarks/lm_data/teacher_hacking.py{' --quick' if quick else ''}`; date: "
              f"{dt.datetime.now().isoformat(timespec='seconds')}; machine: {machine_description()}, torch "
              f"{torch.__version__}._")
    (out / ("teacher_hacking-quick.md" if quick else "teacher_hacking.md")).write_text(header + "\n\n" + section)
    print(section)
