"""Run reports and the leaderboard, on tiny digits runs trained once for the module."""
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_cfg
from distillery.cli import app
from distillery.engine import fit
from distillery.errors import DistilleryError
from distillery.report import metrics as M
from distillery.report import plots, write_report
from distillery.report.compare import compare_runs, group_runs

runner = CliRunner()
FAST = {"latency_repeats": 3, "throughput_repeats": 1}
DATA = {"name": "digits", "batch_size": 32, "train_subset": 300}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """teacher (CNN), a from-scratch MLP, and the same MLP distilled with KD under two seeds."""
    tmp = tmp_path_factory.mktemp("report")
    train = {"epochs": 2, "progress": False}
    mlp = {"arch": "mlp", "kwargs": {"hidden": [32]}}
    teacher = fit(tiny_cfg(tmp, name="teacher", data=DATA, student={"arch": "cnn", "kwargs": {"width": 4}}, train=train))
    scratch = fit(tiny_cfg(tmp, name="scratch", data=DATA, student=mlp, train=train))
    kd = [fit(tiny_cfg(tmp, name=f"kd-s{seed}", data=DATA, student=mlp, teacher={"run": str(teacher.run_dir)},
                       method={"name": "kd"}, train={**train, "seed": seed})) for seed in (0, 1)]
    return {"teacher": teacher, "scratch": scratch, "kd": kd, "dir": teacher.run_dir.parent}


# ---------------------------------------------------------------------------------------------
# Metrics on known values


def test_ece_agreement_and_confusion_match_hand_computation():
    # Two confident samples (p=0.9), one right one wrong, and two unsure ones (p=0.6), both right.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    logits, labels = probs.log(), torch.tensor([0, 1, 1, 1])
    # bins: {0.9}: acc 0.5, conf 0.9 -> gap 0.4; {0.6}: acc 1.0, conf 0.6 -> gap 0.4; each half the samples
    assert M.expected_calibration_error(logits, labels, n_bins=15) == pytest.approx(0.4)
    assert M.accuracy(logits, labels) == pytest.approx(0.75)
    assert M.top1_agreement(logits, torch.tensor([[1.0, 0.0]] * 4)) == pytest.approx(0.5)
    cm = M.confusion_matrix(logits, labels, 2)
    assert cm.tolist() == [[1, 0], [1, 2]]  # rows: true class
    assert M.per_class_accuracy(cm).tolist() == pytest.approx([1.0, 2 / 3])


def test_macs_are_flop_counter_flops_halved():
    assert M.count_macs(nn.Linear(64, 10), torch.zeros(1, 64)) == 64 * 10
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    assert M.count_macs(conv, torch.zeros(1, 1, 8, 8)) == 4 * 9 * 8 * 8


def test_latency_states_threads_and_restores_them():
    from distillery.data import Split

    split = Split(torch.randn(5, 64), torch.zeros(5, dtype=torch.long))
    before = torch.get_num_threads()
    lat = M.measure_latency(nn.Linear(64, 10), split, warmup=2, repeats=5, throughput_repeats=2, threads=1)
    assert lat["threads"] == 1 and torch.get_num_threads() == before
    assert lat["repeats"] == 5 and lat["warmup"] == 2 and lat["throughput_batch"] == 256
    assert 0 < lat["batch1_median_ms"] <= lat["batch1_p90_ms"] and lat["throughput_samples_per_second"] > 0


def test_pareto_front_keeps_only_undominated_points():
    pts = [plots.Point("slow-good", 10, 0.9), plots.Point("fast-bad", 1, 0.5), plots.Point("dominated", 5, 0.4),
           plots.Point("mid", 3, 0.7), plots.Point("tie-slower", 4, 0.7)]
    assert [p.label for p in plots.pareto_front(pts)] == ["fast-bad", "mid", "slow-good"]


# ---------------------------------------------------------------------------------------------
# The report


def test_report_with_baseline(runs):
    kd, scratch = runs["kd"][0], runs["scratch"]
    md_path = write_report(kd.run_dir, baseline=scratch.run_dir, **FAST)
    d = kd.run_dir
    assert md_path == d / "report.md"
    for name in ("learning_curves", "confusion", "per_class_change", "pareto"):
        assert (d / "plots" / f"{name}.png").stat().st_size > 1000
    md = md_path.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| measure"))
    assert "teacher" in header and "from scratch" in header and "distilled student" in header
    for text in ("FlopCounterMode", "MACs = FLOPs / 2", "15 bins", "median of up to 3", "warm-up", "1 torch thread(s)",
                 "speed-up vs teacher", "compression vs teacher", "change vs scratch", "Pareto front"):
        assert text in md, text

    # The numbers agree with what training recorded and with the files.
    rep = json.loads((d / "report.json").read_text())
    s, t, b = rep["models"]["student"], rep["models"]["teacher"], rep["models"]["scratch"]
    assert s["test_accuracy"] == pytest.approx(kd.summary["test_accuracy"])
    assert t["test_accuracy"] == pytest.approx(kd.summary["teacher_test_accuracy"])
    assert b["test_accuracy"] == pytest.approx(scratch.summary["test_accuracy"])
    assert s["params"] == kd.summary["params"] and t["params"] == kd.summary["teacher_params"]
    assert s["size_bytes"] == (d / "model.safetensors").stat().st_size
    assert 0 <= s["agreement_with_teacher"] <= 1 and t["agreement_with_teacher"] is None
    assert 0 <= s["ece"] <= 1 and t["macs"] > s["macs"] > 0
    assert s["threads"] == 1 and s["repeats"] == 3 and s["batch1_median_ms"] > 0  # one thread unless asked otherwise
    assert json.loads((d / "latency.json").read_text())["batch1_median_ms"] == s["batch1_median_ms"]

    # Self-contained HTML: every image inline, nothing fetched from elsewhere.
    html = (d / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 4 and all(src.startswith("data:image/png;base64,") for src in srcs)
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_report_without_teacher_and_without_validation(runs, tmp_path):
    # A copy of the from-scratch run (method ce: no teacher) whose epochs recorded no val accuracy.
    run = shutil.copytree(runs["scratch"].run_dir, tmp_path / "alone" / "scratch")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("val_")}) + "\n"
                                               for r in rows))
    md = write_report(run, measure_latency=False).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| measure"))
    assert "teacher" not in header and "vs teacher" not in md
    assert "No validation accuracy was recorded" in md
    assert "Latency was not measured" in md


def test_not_a_finished_run_is_one_clear_error(tmp_path):
    with pytest.raises(DistilleryError, match=r"missing config\.yaml, summary\.json, model\.safetensors.*distillery train"):
        write_report(tmp_path)
    (tmp_path / "config.yaml").write_text("student: {arch: mlp}\n")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(DistilleryError, match=r"missing summary\.json, model\.safetensors.*--resume"):
        write_report(tmp_path)
    res = runner.invoke(app, ["report", str(tmp_path / "nope")])
    out = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 2 and "is not a directory" in out and "Traceback" not in out


def test_baseline_on_another_test_split_is_refused(runs, tmp_path):
    other = shutil.copytree(runs["scratch"].run_dir, tmp_path / "other")
    cfg = (other / "config.yaml").read_text().replace("split_seed: 0", "split_seed: 3")
    (other / "config.yaml").write_text(cfg)
    with pytest.raises(DistilleryError, match="different test split.*split_seed"):
        write_report(runs["kd"][0].run_dir, baseline=other, measure_latency=False)


# ---------------------------------------------------------------------------------------------
# Leaderboard


def test_group_runs_puts_seeds_together(runs):
    groups = group_runs([runs["dir"]])
    by_label = {g.label: g for g in groups}
    assert set(by_label) == {"teacher", "scratch", "kd"}
    kd = by_label["kd"]
    accs = [r.summary["test_accuracy"] for r in runs["kd"]]
    assert kd.n == 2 and kd.seeds == [0, 1] and kd.method == "kd" and kd.student == "mlp(hidden=[32])"
    assert kd.mean() == pytest.approx(statistics.mean(accs)) and kd.std() == pytest.approx(statistics.stdev(accs))
    means = [g.mean() for g in groups]
    assert means == sorted(means, reverse=True)  # ranked


def test_compare_command_prints_and_writes(runs, tmp_path):
    res = runner.invoke(app, ["compare", str(runs["dir"]), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "kd" in res.output and "±" in res.output and "teacher" in res.output
    md = (tmp_path / "compare.md").read_text()
    assert "| rank | run | method | student | n |" in md and "train.seed" in md
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    # run directories named one by one give the same groups, written to their common parent
    result = compare_runs([r.run_dir for r in runs["kd"]])
    assert [g.n for g in result.groups] == [2] and result.markdown == runs["dir"].resolve() / "compare.md"


# ---------------------------------------------------------------------------------------------
# The HTML page renders, with its images, in a real browser


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (optional: apt-get install chromium)")
def test_report_html_renders_with_images_in_headless_chromium(runs, tmp_path):
    d = runs["kd"][1].run_dir
    write_report(d, measure_latency=False, pareto=False)
    shot = tmp_path / "shot.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
    subprocess.run(["bash", str(script), str(d / "report.html"), str(shot)], check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "NO_INSTALL": "1", "HOME": str(tmp_path)})
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    # The plots' colours (matplotlib blue/orange lines, the blue confusion matrix) can only come
    # from the embedded images: the page's own text and tables are black, grey and white.
    saturated = (rgb.max(-1) - rgb.min(-1)) > 80
    assert saturated.sum() > 2000
