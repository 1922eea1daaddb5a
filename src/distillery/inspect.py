"""Representation inspection: which teacher layer does each student layer resemble?

``distillery inspect CONFIG`` runs the config's teacher and student on one batch of real data,
taps every listed layer of both (``default_feature_layers`` of zoo models, or the layers given),
and computes linear CKA between every teacher layer and every student layer.  It writes a
heat-map (``cka.png``), the matrix as ``cka.csv`` and ``cka.md``, and names the best-matching
teacher layer per student layer -- a guide for ``method.params.pairs``.  The student is the
config's student as built (random initialisation unless ``student.weights`` is set); the
teacher is the trained one.  ``--list`` only prints both models' module paths (the names any tap
or layer pair may use).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from distillery.errors import ConfigError


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment between two representations of the same N samples.

    Kornblith, Norouzi, Lee, Hinton (2019), "Similarity of Neural Network Representations
    Revisited", ICML, Sec. 3: with column-centred X (N, p) and Y (N, q),
    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).  Computed in the equivalent Gram form
    <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F) with K = X X^T, which costs N^2 (p + q) and so suits wide
    conv features; inputs are flattened to (N, -1) and promoted to float64.  In [0, 1]; 1 for
    X vs X; invariant to orthogonal transforms and isotropic scaling of either side (not to
    arbitrary invertible linear maps).  NaN when either side is constant over the samples.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares representations of the same samples: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    kx, ky = x @ x.T, y @ y.T
    den = kx.norm() * ky.norm()
    if den == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (kx * ky).sum() / den


@dataclass
class InspectResult:
    student_layers: list[str]
    teacher_layers: list[str]
    cka: Tensor  # (student layers, teacher layers)
    samples: int
    png: Path
    csv: Path
    markdown: Path

    def best(self) -> dict[str, tuple[str, float]]:
        """Student layer -> (best-matching teacher layer, its CKA)."""
        out = {}
        for i, s in enumerate(self.student_layers):
            row = torch.nan_to_num(self.cka[i], nan=-1.0)
            j = int(row.argmax())
            out[s] = (self.teacher_layers[j], float(self.cka[i, j]))
        return out


def cka_matrix(student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor]) -> Tensor:
    """CKA of every (student layer, teacher layer) pair: (len(student), len(teacher))."""
    return torch.stack([torch.stack([linear_cka(s, t) for t in teacher_feats.values()])
                        for s in student_feats.values()])


@torch.inference_mode()
def capture(model: nn.Module, layers: list[str], inputs, *, batch_size: int, device) -> dict[str, Tensor]:
    """Run ``model`` (in eval mode, restored after) over ``inputs`` in chunks and return the tapped
    features of every layer, concatenated on the CPU."""
    from distillery.models import forward_logits
    from distillery.taps import Taps

    was_training = model.training
    model.eval()
    n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    chunks: dict[str, list[Tensor]] = {name: [] for name in layers}
    with Taps(model, layers) as taps:
        for start in range(0, n, batch_size):
            part = ({k: v[start:start + batch_size].to(device) for k, v in inputs.items()} if isinstance(inputs, dict)
                    else inputs[start:start + batch_size].to(device))
            forward_logits(model, part)
            for name, feat in taps.collect().items():
                chunks[name].append(feat.float().cpu())
    model.train(was_training)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def _layers(model: nn.Module, given: list[str] | None, role: str) -> list[str]:
    layers = list(given or getattr(model, "default_feature_layers", []) or [])
    if not layers:
        raise ConfigError(f"the {role} has no `default_feature_layers`; name its layers to compare "
                          f"(--{role}-layer PATH, repeatable; module paths as in model.named_modules())")
    return layers


def heatmap(cka: Tensor, student_layers: list[str], teacher_layers: list[str], path: Path, title: str = "") -> Path:
    """CKA heat-map, student layers as rows and teacher layers as columns, values written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s, t = len(student_layers), len(teacher_layers)
    fig = Figure(figsize=(1.6 + 1.1 * t, 1.2 + 0.6 * s))
    ax = fig.subplots()
    im = ax.imshow(cka.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(t), teacher_layers, rotation=45, ha="right")
    ax.set_yticks(range(s), student_layers)
    ax.set(xlabel="teacher layer", ylabel="student layer", title=title or "linear CKA")
    for i in range(s):
        for j in range(t):
            v = float(cka[i, j])
            ax.text(j, i, "nan" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    color="black" if v > 0.6 else "white", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _write_tables(res_cka: Tensor, student_layers, teacher_layers, best, out_dir: Path, samples: int) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "cka.csv", out_dir / "cka.md"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student_layer", *teacher_layers])
        for i, s in enumerate(student_layers):
            w.writerow([s, *(f"{float(v):.6f}" for v in res_cka[i])])
    lines = [f"Linear CKA (Kornblith et al. 2019) on {samples} samples; rows: student layers, columns: teacher layers.",
             "", "| student \\ teacher | " + " | ".join(f"`{t}`" for t in teacher_layers) + " | best match |",
             "|---|" + "---:|" * len(teacher_layers) + "---|"]
    for i, s in enumerate(student_layers):
        cells = " | ".join(f"{float(v):.3f}" for v in res_cka[i])
        lines.append(f"| `{s}` | {cells} | `{best[s][0]}` ({best[s][1]:.3f}) |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def build_pair(cfg, data=None) -> tuple[nn.Module, nn.Module]:
    """The config's trained teacher and its student as a run would start it (same seed)."""
    from distillery.data import load_data
    from distillery.engine import load_teacher
    from distillery.methods import get_spec
    from distillery.models import build_model

    if cfg.teacher is None:
        raise ConfigError("`distillery inspect` compares a teacher with a student: the config needs a `teacher:` section")
    data = data or load_data(cfg.data)
    teacher = load_teacher(cfg, data, get_spec(cfg.method.name).teacher_same_classes)
    torch.manual_seed(cfg.train.seed)  # the same student initialisation as the run would get
    student = build_model(cfg.student, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
    return teacher, student


def module_paths(model: nn.Module) -> list[tuple[str, str]]:
    """(dotted path, class name) of every submodule: the names a tap or a layer pair can use."""
    return [(name, type(m).__name__) for name, m in model.named_modules() if name]


def inspect_config(cfg, *, out_dir: Path | None = None, samples: int = 512, split: str = "train",
                   teacher_layers: list[str] | None = None, student_layers: list[str] | None = None) -> InspectResult:
    """CKA between the teacher's and the student's layers on ``samples`` rows of ``split``
    (a seeded random subset, ``cfg.train.seed``; no augmentation).  Writes into ``out_dir``
    (default ``<output_dir>/<name>-inspect``, beside, not inside, the run directory)."""
    from distillery.data import load_data

    if cfg.teacher is None:
        raise ConfigError("`distillery inspect` compares a teacher with a student: the config needs a `teacher:` section")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test (got '{split}')")
    if samples < 2:
        raise ConfigError(f"CKA needs at least 2 samples (got {samples})")
    data = load_data(cfg.data)
    part = getattr(data, split)
    if len(part) < 2:
        raise ConfigError(f"the {split} split has {len(part)} rows; CKA needs at least 2")
    g = torch.Generator().manual_seed(cfg.train.seed)
    rows = torch.randperm(len(part), generator=g)[:samples]
    inputs = part.take(rows).inputs
    n = len(rows)

    teacher, student = build_pair(cfg, data)
    t_layers = _layers(teacher, teacher_layers, "teacher")
    s_layers = _layers(student, student_layers, "student")
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    bs = cfg.data.eval_batch_size
    t_feats = capture(teacher.to(device), t_layers, inputs, batch_size=bs, device=device)
    s_feats = capture(student.to(device), s_layers, inputs, batch_size=bs, device=device)
    cka = cka_matrix(s_feats, t_feats).float()

    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / f"{cfg.name}-inspect"
    out.mkdir(parents=True, exist_ok=True)
    res = InspectResult(s_layers, t_layers, cka, n, out / "cka.png", out / "cka.csv", out / "cka.md")
    heatmap(cka, s_layers, t_layers, res.png, title=f"linear CKA, {cfg.name} ({n} {split} samples)")
    _write_tables(cka, s_layers, t_layers, res.best(), out, n)
    return res


def resolve_auto_pairs(cfg, *, data=None):
    """``method.params.pairs: auto-cka`` -> compute the CKA map now (as ``distillery inspect`` does,
    into ``<output_dir>/<name>-inspect``) and return the config with ``pairs: cka:<that cka.csv>``,
    so the run pairs each student layer with the teacher layer it resembles most.  Any other
    config is returned as is.  Deterministic (seeded rows, the run's student initialisation), so a
    resumed run resolves to the same pairs."""
    from distillery.methods.align import AUTO_CKA, CKA_PREFIX

    if cfg.method.params.get("pairs") != AUTO_CKA:
        return cfg
    res = inspect_config(cfg)
    params = {**cfg.method.params, "pairs": f"{CKA_PREFIX}{res.csv}"}
    return cfg.model_copy(update={"method": cfg.method.model_copy(update={"params": params})})
