"""TGeo-KD: a learnt, sample-wise fusion ratio between KD and label CE (Hu et al., ICLR 2024).

The ratio network and the running class means of the teacher's predictions belong to this
method (trained / checkpointed with the student, not exported). The mathematics lives in
:mod:`distillery.losses.tgeo`.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distillery.losses import tgeo as TG
from distillery.losses.logits import IGNORE_INDEX, _mean_over_positions
from distillery.methods import register
from distillery.methods.base import Method, Params


class TGeoKDParams(Params):
    temperature: float = Field(4.0, gt=0, description="Temperature of the KD term (scaled by T^2).")
    hidden: int = Field(64, ge=1, description="Hidden width of the ratio network (Linear-ReLU-Linear-sigmoid).")
    bilevel: bool = Field(True, description="Train the ratio network with the look-ahead hypergradient on the held-out "
                                            "half of each batch; False leaves it at its initial ratio 0.5.")
    meta_weight: float = Field(1.0, gt=0, description="Scale of the ratio network's hypergradient (with Adam it only "
                                                      "matters relative to weight decay).")


@register("tgeo_kd", params=TGeoKDParams,
          paper="Hu, Wu, Li, Ma, Chen, Yan, Wang & Liu 2024, Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation")
class TGeoKD(Method):
    """TGeo-KD: r_i * KD_i + (1 - r_i) * CE_i with r_i from an MLP on student/teacher/label geometry.

    Training signal of the ratio network. The paper learns it "in a bilevel-optimization manner":
    the student minimises the r-weighted training loss, the ratio network the loss of held-out
    data after that update (taken here as the label CE of held-out samples, the usual outer
    objective of such loss-reweighting schemes; our reading, the paper's full text was not
    available). Trained jointly on the training loss instead, the network would simply put all
    weight on the smaller of KD_i and CE_i, which is useless. A held-out set is not available
    to a method (it sees the current batch only), so each batch is split:

    * the student is updated on the whole batch with the ratios *detached* (terms ``kd`` and
      ``ce``, which sum to ``tgeo_kd`` of the loss module);
    * for the first half A of the batch, the ratio network receives the first-order
      hypergradient of a virtual SGD step on A's weighted loss, measured by the label CE of the
      second half B (``lookahead_alignment``): r_j rises when sample j's KD gradient helps B's
      CE more than its CE gradient does. This arrives through term ``ratio_meta``
      = -meta_weight * mean_j r_j <grad CE_B, grad (KD_j - CE_j)>, which reaches only the ratio
      network's weights (its value is the r-dependent part of the first-order change of B's CE
      per unit step size: negative when the ratios help; small).

    B is held out from the virtual step, not from training (the student also trains on it); a
    true validation split needs the engine to hand methods a held-out batch. The first-order
    look-ahead costs about three extra backward passes per step, and uses double backward
    through the student (not supported with DDP). The last layer of the ratio network starts
    at zero, so training starts from r = 0.5 (plain KD with alpha = 0.5).
    """

    def __init__(self, params: TGeoKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        c = num_classes
        self.ratio_net = nn.Sequential(nn.Linear(6 * c, params.hidden), nn.ReLU(), nn.Linear(params.hidden, 1))
        nn.init.zeros_(self.ratio_net[-1].weight)
        nn.init.zeros_(self.ratio_net[-1].bias)
        # Running sum / count of the teacher's softmax per class: T_bar, the inter-sample anchor.
        # The teacher is frozen, so a plain cumulative mean is the class mean over all views seen.
        self.register_buffer("teacher_class_sum", torch.zeros(c, c))
        self.register_buffer("teacher_class_count", torch.zeros(c))

    @torch.no_grad()
    def update_class_means(self, teacher_logits: torch.Tensor, targets: torch.Tensor) -> None:
        valid = targets != IGNORE_INDEX
        probs = torch.softmax(teacher_logits[valid].float(), dim=-1).to(self.teacher_class_sum.dtype)
        self.teacher_class_sum.index_add_(0, targets[valid], probs)
        self.teacher_class_count.index_add_(0, targets[valid], torch.ones_like(probs[:, 0]))

    def teacher_class_mean(self) -> torch.Tensor:
        return self.teacher_class_sum / self.teacher_class_count.clamp(min=1).unsqueeze(-1)

    def ratio(self, student_logits, teacher_logits, targets) -> torch.Tensor:
        """r in (0, 1) per position; the relations are detached, so r is a function of the
        ratio network's weights only."""
        rel = TG.tgeo_relations(student_logits.detach(), teacher_logits, targets, self.teacher_class_mean())
        return torch.sigmoid(self.ratio_net(rel.to(self.ratio_net[0].weight.dtype))).squeeze(-1)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        c = self.num_classes
        s = student_out.logits.reshape(-1, c)
        t = teacher_out.logits.reshape(-1, c)
        y = targets.reshape(-1)
        if self.training:
            self.update_class_means(t, y)
        ratio = self.ratio(s, t, y)
        kd_i, ce_i = TG.fusion_terms(s, t, y, temperature=p.temperature)
        r = ratio.detach().to(kd_i.dtype)
        terms = {"kd": _mean_over_positions(r * kd_i, y), "ce": _mean_over_positions((1 - r) * ce_i, y)}

        half = y.shape[0] // 2
        if p.bilevel and self.training and torch.is_grad_enabled() and s.requires_grad and half > 0:
            valid = (y[:half] != IGNORE_INDEX).to(kd_i.dtype)
            held_out_ce = _mean_over_positions(ce_i[half:], y[half:])
            alignment = TG.lookahead_alignment((kd_i[:half] - ce_i[:half]) * valid, held_out_ce,
                                               list(self._student.parameters()))
            weighted = ratio[:half] * alignment.to(ratio.dtype) * valid
            terms["ratio_meta"] = -p.meta_weight * weighted.sum() / valid.sum().clamp(min=1)
        return terms
