"""HARD: a learned spatial augmentor that looks for inputs where teacher and student disagree.

Nix, Burg & Sinz (2023), "HARD: Hard Augmentations for Robust Distillation" (the affine /
spatial-transformer variant).  The method owns the augmentor, a small localisation network that
predicts one affine matrix per sample from the image and a noise vector (so the same image gets
different transforms), initialised to the identity; it is an ``nn.Module`` attribute, so it is
trained by the run's one optimiser and checkpointed with the student.

One backward pass, two players.  Per step, with ``x~ = warp(x, A(x, noise))`` and ``R`` the
gradient-reversal layer (identity forward, ``-adversary_weight x grad`` backward):

    s~ = student(R(x~))          t~ = teacher(x~)        (gradients flow back into x~, not the teacher)
    kd_aug        = D(R(t~) || s~)       -> student: descends D;  augmentor: ascends D (both paths reversed)
    teacher_shift = D(t(x) || t~)        -> augmentor only: descends, i.e. keeps the teacher's answer

The student's weights come after ``R`` on its own path, so they get the plain gradient of ``kd_aug``;
every path from ``kd_aug`` back into the augmentor crosses exactly one ``R``, so the augmentor gets
``-adversary_weight`` times that gradient -- it maximises the disagreement -- plus the ordinary gradient
of ``teacher_weight x teacher_shift``, which only it depends on (the teacher is frozen and ``t(x)`` is
the engine's constant clean answer).  ``kd`` (Hinton KD on the clean batch) and an optional ``ce`` on
labels complete the student's loss.

Gradients through the teacher: the augmentor needs ``d t(x~) / d x~`` for both of its terms, so the
teacher runs through ``teacher_forward(x~, grad=True)`` (its weights stay frozen).

Pictures: ``save_grid(path)`` writes a PNG of the last batch's first images (top row) and their
augmented versions (bottom row); at the end of training it is written to the run directory as
``hard_augmentations.png`` (``on_train_end``), and with ``grid_dir`` set also every ``grid_every``
steps as ``hard_step<k>.png``.  ``log_values`` reports ``affine_deviation``, the epoch's mean ``|A - I|``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.hard import apply_affine, disagreement, identity_deviation, reverse_gradient, teacher_shift
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class HARDParams(Params):
    temperature: float = Field(4.0, gt=0, description="Temperature T of every KL term (each scaled by T^2).")
    adversary_weight: float = Field(1.0, ge=0, description="Gradient-reversal factor: how hard the augmentor ascends "
                                                           "the teacher-student disagreement (0 = augmentor ignores it).")
    teacher_weight: float = Field(1.0, ge=0, description="Weight of the penalty keeping the teacher's output on the "
                                                         "augmented input close to its output on the original.")
    aug_weight: float = Field(1.0, ge=0, description="Weight of the student's KD term on the augmented inputs.")
    clean_weight: float = Field(1.0, ge=0, description="Weight of plain KD on the engine's (unaugmented) batch.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of label cross-entropy on the clean batch (HARD itself uses none).")
    max_deviation: float = Field(0.5, gt=0, description="Bound on each entry of A - I (A = I + bound * tanh(raw)), so the "
                                                        "transform cannot collapse the image.")
    augmentor_gain: float = Field(10.0, gt=0, description="raw = gain * (network output): under Adam the augmentor then moves "
                                                          "about gain times faster than a plain layer at the run's one learning rate.")
    noise_dim: int = Field(8, ge=0, description="Size of the noise vector fed to the augmentor with each image.")
    hidden: int = Field(32, ge=1, description="Hidden width of the augmentor's localisation network.")
    seed: int = Field(0, ge=0, description="Seed of the augmentor's noise (step k draws from (seed, k)).")
    grid_dir: str | None = Field(None, description="Directory for PNG grids of original vs augmented images (None = off).")
    grid_every: int = Field(500, ge=1, description="With grid_dir: write a grid every this many steps.")
    grid_samples: int = Field(8, ge=1, description="Images per grid.")


class AffineAugmentor(nn.Module):
    """Localisation network of a spatial transformer: image + noise -> ``A = I + bound * tanh(raw)``,
    ``(N, 2, 3)``.  The last layer starts at zero, so the initial transform is exactly the identity."""

    def __init__(self, in_channels: int, *, noise_dim: int, hidden: int, bound: float, gain: float = 1.0):
        super().__init__()
        self.bound, self.gain = bound, gain
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(16 + noise_dim, hidden), nn.ReLU(), nn.Linear(hidden, 6))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raw = self.gain * self.head(torch.cat([self.encoder(x), noise.to(x.dtype)], 1)).view(-1, 2, 3)
        eye = torch.eye(2, 3, device=x.device, dtype=raw.dtype)
        return eye + self.bound * torch.tanh(raw)


def _main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@register("hard", params=HARDParams, live_teacher=True,
          paper="Nix, Burg & Sinz 2023, HARD: Hard Augmentations for Robust Distillation")
class HARD(Method):
    """HARD: a spatial-transformer augmentor maximises teacher-student disagreement; the student learns on it."""

    def __init__(self, params: HARDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.augmentor: AffineAugmentor | None = None
        # Epoch mean of |A - I| for log_values (buffers: a resumed run keeps the running sum).
        self.register_buffer("deviation_sum", torch.zeros(()))
        self.register_buffer("deviation_count", torch.zeros(()))
        self._last_views: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, student_out, teacher_out) -> None:
        x = student_out.inputs
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"hard warps image batches (N, C, H, W); got inputs {shape}")
        p = self.params
        self.augmentor = AffineAugmentor(x.shape[1], noise_dim=p.noise_dim, hidden=p.hidden, bound=p.max_deviation,
                                         gain=p.augmentor_gain)

    def log_values(self) -> dict[str, float]:
        count = float(self.deviation_count)
        value = float(self.deviation_sum) / count if count else 0.0
        self.deviation_sum.zero_()
        self.deviation_count.zero_()
        return {"affine_deviation": value}

    def save_grid(self, path: str | Path) -> Path:
        """PNG grid: the last training batch's first images (top) above their augmented versions (bottom)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if self._last_views is None:
            raise RuntimeError("save_grid has nothing to show yet: it pictures the last training batch")
        original, augmented = self._last_views
        k = original.shape[0]
        fig = Figure(figsize=(1.2 * k, 2.6))
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, k, squeeze=False)
        for row, (images, label) in enumerate(((original, "original"), (augmented, "augmented"))):
            for i in range(k):
                ax = axes[row][i]
                ax.imshow(_displayable(images[i]), cmap="gray" if images.shape[1] != 3 else None)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[row][0].set_ylabel(label)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80, bbox_inches="tight")
        return path

    def on_train_end(self, run_dir) -> None:
        """The run's picture of what the augmentor learned: ``<run_dir or grid_dir>/hard_augmentations.png``."""
        if self._last_views is not None:
            self.save_grid(Path(self.params.grid_dir or run_dir) / "hard_augmentations.png")

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        x = student_out.inputs
        if self.augmentor is None:
            raise RuntimeError("hard: setup() was not called (the engine calls it with a probe batch)")
        g = torch.Generator().manual_seed(p.seed * 2**32 + progress.step)
        noise = torch.randn(x.shape[0], p.noise_dim, generator=g).to(x.device)
        theta = self.augmentor(x, noise)
        x_aug = apply_affine(x, theta)

        s_aug = self.student_forward(reverse_gradient(x_aug, p.adversary_weight))
        t_aug = self.teacher_forward(x_aug, grad=True).logits  # gradients reach x_aug, hence the augmentor
        t_clean = teacher_out.logits
        terms = {
            "kd_aug": p.aug_weight * disagreement(s_aug, reverse_gradient(t_aug, p.adversary_weight), temperature=p.temperature),
            "teacher_shift": p.teacher_weight * teacher_shift(t_aug, t_clean, temperature=p.temperature),
        }
        if p.clean_weight > 0:
            terms["kd"] = p.clean_weight * L.kd(student_out.logits, t_clean, temperature=p.temperature)
        if p.ce_weight > 0:
            terms["ce"] = p.ce_weight * L.cross_entropy(student_out.logits, None, targets)

        if self.training:
            self.deviation_sum += identity_deviation(theta.detach()).to(self.deviation_sum)
            self.deviation_count += 1
            k = min(p.grid_samples, x.shape[0])
            self._last_views = (x[:k].detach().float().cpu(), x_aug[:k].detach().float().cpu())
            if p.grid_dir is not None and _main_process() and progress.step % p.grid_every == 0:
                self.save_grid(Path(p.grid_dir) / f"hard_step{progress.step:07d}.png")
        return terms


def _displayable(image: torch.Tensor):
    """(C, H, W) normalised tensor -> (H, W) or (H, W, 3) array in [0, 1] (min-max per image)."""
    img = image[:3] if image.shape[0] == 3 else image[0]
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo).clamp_min(1e-8)
    return img.permute(1, 2, 0).numpy() if img.dim() == 3 else img.numpy()
