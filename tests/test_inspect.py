"""Linear CKA against its definition, and `distillery inspect` end to end on digits."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import tiny_cfg
from distillery.inspect import cka_matrix, inspect_config, linear_cka

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _orthogonal(n, seed=0):
    q, _ = torch.linalg.qr(_randn(n, n, seed=seed))
    return q


def test_cka_hand_values():
    # one feature each: linear CKA is the squared Pearson correlation; centred x = (-1, 0, 1),
    # y = (0, -1, 1): correlation 1/2, CKA 1/4
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [2.0]])).item() == pytest.approx(0.25)
    # X = (+-e1, +-e2) (already centred), Y = its first column:
    # ||Y^T X||^2 = ||(2, 0)||^2 = 4, ||X^T X|| = ||2 I|| = sqrt 8, ||Y^T Y|| = 2 -> 1/sqrt 2
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=D)
    assert linear_cka(x, x[:, :1]).item() == pytest.approx(2 ** -0.5, rel=1e-12)


def test_cka_equals_the_feature_space_formula():
    x, y = _randn(12, 5, seed=1), _randn(12, 30, seed=2)  # p < N < q: both regimes
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y).item() == pytest.approx(expected.item(), rel=1e-12)


def test_cka_invariances_and_range():
    x, y = _randn(20, 6, seed=3), _randn(20, 4, 2, 2, seed=4)  # maps are flattened
    ref = linear_cka(x, y).item()
    assert 0.0 <= ref <= 1.0
    assert linear_cka(x, x).item() == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(x, 3.0 * x @ _orthogonal(6) + 5.0).item() == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(0.1 * x @ _orthogonal(6, seed=1), 7.0 * y).item() == pytest.approx(ref, rel=1e-10)
    assert linear_cka(y, x).item() == pytest.approx(ref, rel=1e-12)  # symmetric
    # not invariant to an arbitrary invertible linear map (the paper's point against CCA)
    a = torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0, 0.1], dtype=D))
    assert linear_cka(x, x @ a).item() < 0.99
    assert torch.isnan(linear_cka(torch.ones(5, 3), _randn(5, 2)))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(_randn(4, 2), _randn(5, 2))


def test_cka_matrix_layout():
    s = {"a": _randn(8, 3, seed=5), "b": _randn(8, 4, seed=6)}
    t = {"x": s["b"].clone(), "y": _randn(8, 2, seed=7), "z": s["a"] * 2}
    m = cka_matrix(s, t)
    assert m.shape == (2, 3)
    assert m[0, 2].item() == pytest.approx(1.0) and m[1, 0].item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from distillery.engine import fit

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_cfg(tmp, name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}, train={"epochs": 1, "progress": False})
    return fit(cfg)


def test_inspect_writes_heatmap_and_tables(tmp_path, teacher_run):
    cfg = tiny_cfg(tmp_path, name="pkt-mlp", teacher={"run": str(teacher_run.run_dir)},
                   student={"arch": "mlp", "kwargs": {"hidden": [32, 16]}}, method={"name": "pkt"})
    res = inspect_config(cfg, samples=100)
    assert res.png.parent == tmp_path / "runs" / "pkt-mlp-inspect"  # beside the run dir, not in it
    assert not cfg.run_dir.exists()
    assert res.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.png.stat().st_size > 1000
    assert res.student_layers == ["layers.0", "layers.1"] and res.teacher_layers == ["features.0", "features.1", "features.3"]
    assert res.cka.shape == (2, 3) and res.samples == 100
    assert bool(((res.cka >= 0) & (res.cka <= 1)).all())
    rows = list(csv.reader(res.csv.open()))
    assert rows[0] == ["student_layer", *res.teacher_layers] and [r[0] for r in rows[1:]] == res.student_layers
    assert float(rows[1][2]) == pytest.approx(float(res.cka[0, 1]), abs=1e-6)
    md = res.markdown.read_text()
    best = res.best()
    assert f"`{best['layers.1'][0]}`" in md and "| `layers.0` |" in md
    assert best["layers.0"][1] == pytest.approx(float(res.cka[0].max()))


def test_inspect_a_copy_of_the_teacher_matches_layer_by_layer(tmp_path, teacher_run):
    """Student = the teacher's architecture and weights: each layer's best match is itself (CKA 1)."""
    weights = str(teacher_run.run_dir / "model.safetensors")
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher_run.run_dir)}, method={"name": "kd"},
                   student={"arch": "cnn", "kwargs": {"width": 8}, "weights": weights})
    res = inspect_config(cfg, samples=64, split="val", out_dir=tmp_path / "out",
                         student_layers=["features.1", "features.3"])
    assert {s: t for s, (t, _) in res.best().items()} == {"features.1": "features.1", "features.3": "features.3"}
    assert res.cka[0, 1].item() == pytest.approx(1.0, abs=1e-5) and res.cka[1, 2].item() == pytest.approx(1.0, abs=1e-5)


def test_inspect_cli(tmp_path, teacher_run):
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app

    cfg = {"name": "s", "output_dir": str(tmp_path / "runs"), "data": {"name": "digits"},
           "teacher": {"run": str(teacher_run.run_dir)}, "student": {"arch": "mlp", "kwargs": {"hidden": [16]}},
           "method": {"name": "rkd"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "inspect"
    r = CliRunner().invoke(app, ["inspect", str(path), "--samples", "50", "--out", str(out),
                                 "--teacher-layer", "features.3", "--teacher-layer", "features.0"])
    assert r.exit_code == 0, r.output
    assert "layers.0" in r.output and "features." in r.output and (out / "cka.png").is_file()
    listed = CliRunner().invoke(app, ["inspect", str(path), "--list"])
    assert listed.exit_code == 0, listed.output
    assert "features.3" in listed.output and "layers.0" in listed.output and "Linear" in listed.output
    bad = CliRunner().invoke(app, ["inspect", str(path), "--teacher-layer", "nope"])
    assert bad.exit_code == 2 and "no module 'nope'" in bad.output
    no_teacher = tmp_path / "n.yaml"
    no_teacher.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "teacher"} | {"method": {"name": "ce"}}))
    r = CliRunner().invoke(app, ["inspect", str(no_teacher)])
    assert r.exit_code == 2 and "teacher" in r.output


def _write_map(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        for r in rows:
            w.writerow(r)
    return path


def test_pairs_read_off_a_cka_map_keep_the_best_matches_in_student_order(tmp_path):
    from distillery.methods.align import pairs_from_cka
    from distillery.models import build_model
    from distillery.config import ModelSpec

    mlp = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [8, 8, 8]}), in_channels=1, num_classes=10, input_size=(8, 8))
    path = _write_map(tmp_path / "cka.csv", [["student_layer", "t1", "t2", "t3"],
                                             ["layers.0", "0.9", "0.2", "nan"],
                                             ["layers.1", "0.1", "0.3", "0.5"],
                                             ["layers.2", "0.2", "0.95", "0.4"]])
    assert pairs_from_cka(path, mlp, 1) == [("layers.2", "t2")]
    assert pairs_from_cka(path, mlp, 2) == [("layers.0", "t1"), ("layers.2", "t2")]
    assert pairs_from_cka(path, mlp, 5) == [("layers.0", "t1"), ("layers.1", "t3"), ("layers.2", "t2")]
    other = _write_map(tmp_path / "other.csv", [["student_layer", "t1"], ["blocks.3", "0.5"]])
    with pytest.raises(ValueError, match="another student"):
        pairs_from_cka(other, mlp, 1)
    junk = tmp_path / "junk.csv"
    junk.write_text("hello,world\n1,2\n")
    with pytest.raises(ValueError, match="not a CKA map"):
        pairs_from_cka(junk, mlp, 1)
    with pytest.raises(ValueError, match="no CKA map"):
        pairs_from_cka(tmp_path / "missing.csv", mlp, 1)


def test_pairs_text_is_validated():
    from distillery.methods import get_spec

    spec = get_spec("fitnets")
    assert spec.validate_params({"pairs": "auto-cka"}).pairs == "auto-cka"
    with pytest.raises(ValueError, match="auto-cka"):
        spec.validate_params({"pairs": "deepest"})


def test_auto_cka_pairs_are_chosen_from_the_inspect_map_and_a_run_uses_them(tmp_path, teacher_run):
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app
    from distillery.engine import fit
    from distillery.inspect import resolve_auto_pairs

    cfg = tiny_cfg(tmp_path, name="fit-auto", teacher={"run": str(teacher_run.run_dir)},
                   student={"arch": "mlp", "kwargs": {"hidden": [32, 16]}},
                   method={"name": "fitnets", "params": {"pairs": "auto-cka", "n_pairs": 1}},
                   train={"epochs": 1, "progress": False, "report": False})
    with pytest.raises(Exception, match="resolved before training"):
        fit(cfg)
    resolved = resolve_auto_pairs(cfg)
    csv_path = tmp_path / "runs" / "fit-auto-inspect" / "cka.csv"
    assert resolved.method.params["pairs"] == f"cka:{csv_path}"
    rows = list(csv.reader(csv_path.open()))
    teacher_layers = rows[0][1:]
    best = max(((float(v), r[0], teacher_layers[j]) for r in rows[1:] for j, v in enumerate(r[1:])))
    from distillery.methods import get_spec
    from distillery.models import build_model

    student = build_model(cfg.student, in_channels=1, num_classes=10, input_size=(8, 8))
    spec = get_spec("fitnets")
    method = spec.cls(spec.validate_params(resolved.method.params), student=student, teacher_layers=None, num_classes=10)
    assert method.pairs == [(best[1], best[2])]
    # Through the CLI: the run directory's config names the map it used.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "cli-auto", "output_dir": str(tmp_path / "runs"),
                                    "data": {"name": "digits", "batch_size": 32},
                                    "teacher": {"run": str(teacher_run.run_dir)},
                                    "student": {"arch": "mlp", "kwargs": {"hidden": [32, 16]}},
                                    "method": {"name": "fitnets", "params": {"pairs": "auto-cka"}},
                                    "train": {"epochs": 1, "progress": False, "report": False}}))
    r = CliRunner().invoke(app, ["distill", str(path)])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "runs" / "cli-auto" / "config.yaml").read_text())
    assert saved["method"]["params"]["pairs"] == f"cka:{tmp_path / 'runs' / 'cli-auto-inspect' / 'cka.csv'}"
