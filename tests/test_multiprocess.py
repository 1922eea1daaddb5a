"""Two processes (torchrun -> Accelerate's MULTI_CPU, gloo) reach the 1-process result.

Note: in accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts ONE process
(DistributedType.NO); torch's own launcher `torchrun` sets RANK/WORLD_SIZE and Accelerate
then runs multi-CPU data parallel over gloo.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

_port = [29600]


def _launch(n: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    _port[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_port[0]),
           "-m", "distillery.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    out = tmp_path / "runs"
    base = {"output_dir": str(out), "student": {"arch": "mlp", "kwargs": {"hidden": [32]}},
            "train": {"epochs": 2, "progress": False, "report": False, "optimizer": {"lr": 0.003}}}
    teacher = tmp_path / "t.yaml"
    teacher.write_text(yaml.safe_dump({**base, "name": "t", "data": {"name": "digits", "batch_size": 64}}))
    r = _launch(1, "train", str(teacher), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # the same global batch of 64: one process x 64 rows vs two processes x 32 rows each
    kd = {**base, "teacher": {"run": str(out / "t"), "cache": {"shard_size": 300}}, "method": {"name": "kd"}}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**kd, "name": "one", "data": {"name": "digits", "batch_size": 64}}))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**kd, "name": "two", "data": {"name": "digits", "batch_size": 32}}))
    r = _launch(2, "cache", "build", str(two), cwd=tmp_path)  # shards split across the two processes
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "teacher-cache" / "t" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    for cfg, n in ((one, 1), (two, 2)):
        r = _launch(n, "distill", str(cfg), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    s1 = json.loads((out / "one" / "summary.json").read_text())
    s2 = json.loads((out / "two" / "summary.json").read_text())
    assert s1["teacher_source"] == s2["teacher_source"] == "cache"
    assert abs(s1["test_accuracy"] - s2["test_accuracy"]) <= 0.01  # stated tolerance: 1 point
    w1, w2 = load_file(str(out / "one" / "model.safetensors")), load_file(str(out / "two" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_lm_distillation_two_processes_match_one(tmp_path):
    """`distillery lm distill` under torchrun: 2 processes x 2 sequences = 1 process x 4."""
    from lm_helpers import make_model, make_tokenizer, source_glob

    tok = make_tokenizer(tmp_path / "tok")
    teacher = make_model(tmp_path / "teacher", tok, n_layer=2, n_embd=32, n_positions=64, dropout=0.0)
    student = make_model(tmp_path / "student", tok, n_layer=1, n_embd=32, n_positions=64, seed=1, dropout=0.0)
    base = {"output_dir": str(tmp_path / "runs"), "teacher": {"path": str(teacher)}, "student": {"path": str(student)},
            "data": {"source": source_glob(), "block_size": 32, "eval_fraction": 0.25, "max_eval_blocks": 4},
            "loss": {"name": "jsd", "params": {"beta": 0.5}}}
    for name, n, batch in (("one", 1, 4), ("two", 2, 2)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**base, "name": name, "train": {"max_steps": 3, "batch_size": batch,
                                                                      "progress": False, "lr": 1e-3}}))
        r = _launch(n, "lm", "distill", str(cfg), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    w1 = load_file(str(tmp_path / "runs" / "one" / "student" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "runs" / "two" / "student" / "model.safetensors"))
    w0 = load_file(str(student / "model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
