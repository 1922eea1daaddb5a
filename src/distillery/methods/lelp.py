"""LELP: distil pseudo-subclasses found by linear projections of the teacher's embeddings.

Loo, Iliopoulos, Hu, Vee (2024), "Linear Projections of Teacher Embeddings for Few-Class
Distillation".  For binary and few-class tasks, where the teacher's probabilities say little,
each class is split into S pseudo-subclasses along principal directions of the teacher's
class-conditional embeddings, and the student learns the teacher's C*S subclass distribution
(:mod:`distillery.losses.lelp` holds the mathematics).

The student's side: an extra linear head on the student's penultimate embedding gives C*S
subclass logits u; the student's own classifier gives the class logits z; the student's joint
distribution is ``q(c, s) = softmax(z)_c * softmax_s(u_c)``, so its class probability -- the sum
over a class's subclasses -- is exactly the student's own classifier, which is what is exported
and evaluated.  (The paper's student has one C*S head and sums it; ours factorises the same
distribution so that no wrapper has to survive export.)  The subclass head belongs to this
method (trained and checkpointed with the student, not exported).

Where the subclass basis comes from: the paper runs the teacher over the training set before
distillation.  A method only sees training batches (``setup`` gets one probe batch), so the
first ``basis_epochs`` epoch(s) double as that pass: the per-class moments of the teacher's
embeddings are accumulated batch by batch (float64 buffers, checkpointed), and at the end the
basis is computed once and frozen.  During that first pass the student trains on the class
marginal alone, i.e. plain KD, which is LELP with S = 1.  The null space of the teacher's
classifier is taken from the classifier recovered by least squares from the same pass (a
method never holds the teacher; see :mod:`distillery.losses.diswot_kd`).  In a multi-process
run the moments are summed over processes when the basis is built; a run resumed inside the
first pass keeps the main process's moments only.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distillery.losses import lelp as LL
from distillery.losses import logits as L
from distillery.losses.diswot_kd import head_moments, recover_linear_head
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params
from distillery.methods.nd import sum_over_processes
from distillery.methods.relation import embedding


class LELPParams(Params):
    n_subclasses: int = Field(4, ge=1, description="S: pseudo-subclasses per class (1 = plain KD).")
    beta: float = Field(1.0, gt=0, description="Subclass temperature, in standard deviations of the class's coordinates.")
    temperature: float = Field(4.0, gt=0, description="Temperature T of the class probabilities (loss scaled by T^2).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the LELP loss; labels get 1 - alpha (the paper's "
                                                      "experiments use no label term: alpha 1).")
    null_space: bool = Field(True, description="Project the embeddings onto the null space of the teacher's classifier before PCA.")
    rotate: bool = Field(True, description="Mix each class's top-S directions by a random rotation (equal variance).")
    basis_epochs: float = Field(1.0, gt=0, description="Epochs of teacher embeddings collected before the basis is built.")
    seed: int = Field(0, description="Seed of the random rotations.")
    teacher_embedding: str = Field("head:input", description="Tap giving the teacher's penultimate embedding.")
    student_embedding: str = Field("head:input", description="Tap giving the student's penultimate embedding.")


_STATS = ("m_count", "m_sum", "m_outer", "h_gram", "h_cross", "h_t_sq")
_BASIS = ("centres", "directions", "scales")


@register("lelp", params=LELPParams,
          paper="Loo, Iliopoulos, Hu & Vee 2024, Linear Projections of Teacher Embeddings for Few-Class Distillation")
class LELP(Method):
    """LELP: the student learns the teacher's pseudo-subclasses (class-wise principal directions of its embeddings)."""

    def __init__(self, params: LELPParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.student_taps = [params.student_embedding]
        self.teacher_taps = [params.teacher_embedding]
        self.subclass_head: nn.Module | None = None  # built in setup, once the widths are known
        for name in (*_STATS, *_BASIS):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def _embeddings(self, student_out: ModelOutput, teacher_out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        return (embedding(student_out.features[p.student_embedding], "pool"),
                embedding(teacher_out.features[p.teacher_embedding], "pool"))

    def setup(self, student_out, teacher_out):
        s, t = self._embeddings(student_out, teacher_out)
        c, d, k, dev = self.num_classes, t.shape[1], self.params.n_subclasses, t.device
        if k > d:
            raise ValueError(f"n_subclasses={k} exceeds the teacher embedding's width {d}; use at most {d}")
        self.subclass_head = nn.Linear(s.shape[1], c * k)
        f64 = dict(dtype=torch.float64, device=dev)
        self.m_count, self.m_sum, self.m_outer = torch.zeros(c, **f64), torch.zeros(c, d, **f64), torch.zeros(c, d, d, **f64)
        self.h_gram, self.h_cross, self.h_t_sq = torch.zeros(d + 1, d + 1, **f64), torch.zeros(d + 1, c, **f64), torch.zeros((), **f64)
        self.centres, self.directions, self.scales = (torch.zeros(c, d, device=dev), torch.zeros(c, k, d, device=dev),
                                                      torch.ones(c, device=dev))

    @torch.no_grad()
    def _collect(self, t_emb: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor) -> None:
        for name, value in zip(_STATS, (*LL.class_moments(t_emb, targets, self.num_classes), *head_moments(t_emb, t_logits))):
            getattr(self, name).add_(value)

    @torch.no_grad()
    def _build_basis(self) -> None:
        p = self.params
        for name in _STATS:
            sum_over_processes(getattr(self, name))
        projector = None
        if p.null_space:
            w, _, residual = recover_linear_head(self.h_gram, self.h_cross, self.h_t_sq)
            if residual > 1e-3:
                raise ValueError(f"the teacher's logits are not a linear function of '{p.teacher_embedding}' (least "
                                 f"squares leaves {residual:.2g} unexplained), so its classifier's null space is unknown; "
                                 "tap the input of the teacher's final linear layer or set method.params.null_space: false")
            projector = LL.null_space_projector(w)
        generator = torch.Generator().manual_seed(p.seed) if p.rotate else None
        centres, directions, scales = LL.subclass_basis(self.m_count.cpu(), self.m_sum.cpu(), self.m_outer.cpu(),
                                                        p.n_subclasses, projector=None if projector is None else projector.cpu(),
                                                        generator=generator)
        for name, value in zip(_BASIS, (centres, directions, scales)):
            getattr(self, name).copy_(value)
        self.ready.fill_(True)

    def log_values(self) -> dict[str, float]:
        return {"lelp_basis_ready": float(self.ready)}

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        s, t = self._embeddings(student_out, teacher_out)
        if self.training and not bool(self.ready):
            if progress.epoch < p.basis_epochs:
                self._collect(t, teacher_out.logits, targets)
            else:
                self._build_basis()
        u = self.subclass_head(s).view(s.shape[0], self.num_classes, p.n_subclasses)
        if bool(self.ready):
            probs = LL.subclass_targets(teacher_out.logits, t, self.centres, self.directions, self.scales,
                                        temperature=p.temperature, beta=p.beta)
            lelp = LL.lelp_loss(student_out.logits, u, probs, temperature=p.temperature)
        else:  # first pass: the class marginal alone (LELP with S = 1); the head joins with weight 0
            lelp = L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature) + 0 * u.sum()
        terms = {"lelp": p.alpha * lelp}
        if p.alpha < 1:
            terms["ce"] = (1 - p.alpha) * L.cross_entropy(student_out.logits, None, targets)
        return terms
