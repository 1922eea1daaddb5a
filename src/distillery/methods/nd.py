"""KD++: KD plus the ND loss on the student's embedding (Wang et al. 2023).

Wang, Cheng, Duan, Wang, Feng, Kong (2023), "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction".  The student's penultimate embedding should point along the
teacher's class mean of the sample's class and be at least as long as the teacher's embedding
(:func:`distillery.losses.nd.nd_loss`); the method adds this to label CE and KD.  When the
widths differ, the student embedding is projected to the teacher's width by BN-Dropout-Linear,
the released code's ``EmbTrans``; the projector belongs to this method (trained and
checkpointed, not exported) and the student's own head still reads the unprojected embedding.

Class means: the paper's code precomputes them once, with the frozen teacher, over the whole
training set (``emb_fea_distribution.py`` -> ``center_emb_train.json``).  A method only sees
training batches, so here they are a running mean over every training batch seen, kept in
buffers (checkpointed; summed over processes in multi-process training).  The teacher is frozen,
so the running mean converges to that class mean: after one epoch without augmentation it is
the mean over the epoch's rows (all but the ragged last batch), with augmentation the mean
over the views seen.  Each batch is added before it is used, so every class in a batch has a
centre from the first step on (from few samples at first).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.nd import class_sums, nd_loss
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params
from distillery.methods.relation import embedding


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over the processes of a distributed run (no-op in a single process):
    statistics kept by a method (class means, moments) then agree on every process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class NDParams(Params):
    nd_weight: float = Field(1.0, ge=0, description="Weight of the ND loss (1 by default in the released code; "
                                                    "0.5-2 in its CIFAR-100 KD++ scripts).")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KD term (1-4 in the released CIFAR-100 scripts).")
    temperature: float = Field(4.0, gt=0, description="KD temperature (4 in the released code).")
    kd_warmup_epochs: float = Field(0.0, ge=0, description="Ramp the KD weight linearly over this many epochs "
                                                           "(20 of 240 in the released code; 0 = off).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
    student_embedding: str = Field("head:input", description="Tap giving the student's penultimate embedding.")
    teacher_embedding: str = Field("head:input", description="Tap giving the teacher's penultimate embedding.")
    projector_dropout: float = Field(0.5, ge=0, lt=1, description="Dropout of the width projector (0.5 in EmbTrans).")


@register("nd", params=NDParams,
          paper="Wang et al. 2023, Improving Knowledge Distillation via Regularizing Feature Norm and Direction")
class NormDirection(Method):
    """KD++: KD plus the ND loss (student embedding along the teacher's class mean, norm at least the teacher's)."""

    def __init__(self, params: NDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.student_taps = [params.student_embedding]
        self.teacher_taps = [params.teacher_embedding]
        self.projector: nn.Module = nn.Identity()
        self.register_buffer("centre_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("centre_count", torch.zeros(num_classes, dtype=torch.float64))

    def _embeddings(self, student_out: ModelOutput, teacher_out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        return (embedding(student_out.features[p.student_embedding], "pool"),
                embedding(teacher_out.features[p.teacher_embedding], "pool"))

    def setup(self, student_out, teacher_out):
        s, t = self._embeddings(student_out, teacher_out)
        if s.shape[1] != t.shape[1]:
            self.projector = nn.Sequential(nn.BatchNorm1d(s.shape[1]), nn.Dropout(self.params.projector_dropout),
                                           nn.Linear(s.shape[1], t.shape[1]))
            nn.init.zeros_(self.projector[2].bias)
        self.centre_sum = torch.zeros(self.num_classes, t.shape[1], dtype=torch.float64, device=t.device)

    def class_centres(self) -> torch.Tensor:
        """The teacher's running class-mean embeddings (C, D); rows of unseen classes are 0."""
        return self.centre_sum / self.centre_count.clamp_min(1).unsqueeze(1)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        s, t = self._embeddings(student_out, teacher_out)
        if self.training:
            with torch.no_grad():
                sums, counts = class_sums(t.detach().double(), targets, self.num_classes)
                self.centre_sum += sum_over_processes(sums)
                self.centre_count += sum_over_processes(counts)
        nd = nd_loss(self.projector(s), t, self.class_centres().to(t.dtype), targets)
        ramp = min(1.0, progress.epoch / p.kd_warmup_epochs) if p.kd_warmup_epochs > 0 else 1.0
        return {"nd": p.nd_weight * nd,
                "kd": p.kd_weight * ramp * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature),
                "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}
