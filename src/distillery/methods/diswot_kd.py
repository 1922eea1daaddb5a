"""DisWOT as a distiller: KD plus DisWOT's semantic and sample-relation similarity losses.

Dong, Li, Wei (2023), "DisWOT: Student Architecture Search for Distillation WithOut Training",
CVPR.  The search part (training-free scores of candidate students) lives in
:mod:`distillery.search.proxies`; the paper adds that its two similarity metrics "can be
extended as distillers".  Here they are: with the last feature maps F of teacher and student
(the map the classifier pools) and their classifiers W,

* semantic: per sample the class activation maps ReLU(W F) (C x L) and their C x C inter-class
  Gram matrix, row-normalised, L2 between teacher and student
  (:func:`distillery.losses.diswot_kd.semantic_loss`);
* relation: the B x B Gram matrix of the flattened F over the batch, row-normalised, L2
  (:func:`distillery.losses.diswot_kd.relation_loss`);

added to label CE and KD.  Both compare C x C or B x B matrices, so any widths, map sizes and
families (CNN -> MLP, CNN -> ViT) work without a projector.  The released code has no DisWOT
distiller (only the metrics), so the weights are ours: the relation term is the
similarity-preserving loss of Tung & Mori, with its usual weight 3000; the semantic term is of
the same form on C x C matrices and gets a weight that puts it on the scale of the label CE.

The teacher's classifier: a method never holds the teacher, so its W is recovered by least
squares from the classifier's input (``teacher_embedding``) and the logits over the first
training batches (:func:`distillery.losses.diswot_kd.recover_linear_head`) -- exact for a
linear head once the inputs span the feature space, i.e. after a few batches (2 (D + 1)
samples are collected); until then the semantic term is 0.  The share of the logits the fit
leaves unexplained is logged as ``method_diswot_head_residual`` (~1e-12 for a zoo teacher);
a teacher whose head is not linear in the tapped feature is refused with a message.
"""
from __future__ import annotations

import torch
from pydantic import Field

from distillery.losses import logits as L
from distillery.losses.diswot_kd import head_moments, recover_linear_head, relation_loss, semantic_loss
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params
from distillery.methods.nd import sum_over_processes
from distillery.methods.relation import embedding
from distillery.search.proxies import _as_channels, _last_feature_tap, classifier


class DisWOTParams(Params):
    semantic_weight: float = Field(50.0, ge=0, description="Weight of the semantic (CAM inter-class Gram) loss.")
    relation_weight: float = Field(3000.0, ge=0, description="Weight of the sample-relation (batch Gram) loss "
                                                             "(3000: the SP weight of the CRD benchmark code).")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the Hinton KD term.")
    temperature: float = Field(4.0, gt=0, description="KD temperature.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
    student_feature: str | None = Field(None, description="Student's last feature map; default: the input of its "
                                                          "global pool (zoo CNNs), else its deepest stage.")
    teacher_feature: str | None = Field(None, description="Teacher's last feature map; default: its deepest stage.")
    teacher_embedding: str = Field("head:input", description="Input of the teacher's linear classifier (to recover it).")
    max_head_residual: float = Field(1e-3, gt=0, description="Refuse a teacher whose logits the recovered linear "
                                                             "head explains worse than this (unexplained share).")


@register("diswot", params=DisWOTParams,
          paper="Dong, Li & Wei 2023, DisWOT: Student Architecture Search for Distillation WithOut Training")
class DisWOT(Method):
    """DisWOT distiller: KD plus L2 between teacher and student CAM inter-class and batch Gram matrices."""

    def __init__(self, params: DisWOTParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.student_feature = params.student_feature or _last_feature_tap(student)
        if params.teacher_feature is None and not teacher_layers:
            raise ValueError("cannot choose the teacher's last feature map for a teacher without `default_feature_layers`; "
                             "give method.params.teacher_feature (a module path, e.g. layer4)")
        self.teacher_feature = params.teacher_feature or teacher_layers[-1]
        self.student_taps = [self.student_feature]
        self.teacher_taps = list(dict.fromkeys([self.teacher_feature, params.teacher_embedding]))
        # A plain reference, not a submodule: the classifier's weights belong to the student.
        # classifier() raises, naming the fix, for a model without an nn.Linear.
        object.__setattr__(self, "student_head", classifier(student))
        for name in ("head_gram", "head_cross", "head_w", "head_b"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("head_t_sq", torch.zeros((), dtype=torch.float64))
        self.register_buffer("head_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("head_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("head_residual", torch.full((), float("nan"), dtype=torch.float64))

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        f_s = student_out.features[self.student_feature]
        if _as_channels(f_s, self.student_head.in_features) is None:
            raise ValueError(f"student feature '{self.student_feature}' {tuple(f_s.shape)} has no axis of the classifier's "
                             f"width {self.student_head.in_features}; set method.params.student_feature to the map the "
                             "classifier pools")
        e_t = embedding(teacher_out.features[self.params.teacher_embedding], "pool")
        f_t = teacher_out.features[self.teacher_feature]
        if _as_channels(f_t, e_t.shape[1]) is None:
            raise ValueError(f"teacher feature '{self.teacher_feature}' {tuple(f_t.shape)} has no axis of the width "
                             f"{e_t.shape[1]} of '{self.params.teacher_embedding}'; set method.params.teacher_feature "
                             "to the map the teacher's classifier pools")
        d, c, dev = e_t.shape[1], teacher_out.logits.shape[-1], e_t.device
        self.head_gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev)
        self.head_cross = torch.zeros(d + 1, c, dtype=torch.float64, device=dev)
        self.head_w = torch.zeros(c, d, device=dev)
        self.head_b = torch.zeros(c, device=dev)

    @torch.no_grad()
    def _learn_teacher_head(self, teacher_out: ModelOutput) -> None:
        """Accumulate the least-squares moments of the teacher's head; solve once enough rows came."""
        x = embedding(teacher_out.features[self.params.teacher_embedding], "pool")
        gram, cross, t_sq = head_moments(x, teacher_out.logits)
        self.head_gram += sum_over_processes(gram)
        self.head_cross += sum_over_processes(cross)
        self.head_t_sq += sum_over_processes(t_sq)
        self.head_count += sum_over_processes(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        if self.head_count < 2 * self.head_gram.shape[0]:
            return
        w, b, residual = recover_linear_head(self.head_gram, self.head_cross, self.head_t_sq)
        if residual > self.params.max_head_residual:
            raise ValueError(f"the teacher's logits are not a linear function of '{self.params.teacher_embedding}' "
                             f"(least squares leaves {residual:.2g} of them unexplained); set "
                             "method.params.teacher_embedding to the input of the teacher's final linear layer")
        self.head_w, self.head_b = w.to(self.head_w.dtype), b.to(self.head_b.dtype)
        self.head_residual.fill_(residual)
        self.head_ready.fill_(True)

    def log_values(self) -> dict[str, float]:
        return {"diswot_head_residual": float(self.head_residual)} if bool(self.head_ready) else {}

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        f_s = student_out.features[self.student_feature]
        f_t = teacher_out.features[self.teacher_feature]
        if self.training and not bool(self.head_ready):
            self._learn_teacher_head(teacher_out)
        semantic = f_s.new_zeros((), dtype=torch.float32)
        if bool(self.head_ready):
            semantic = semantic_loss(_as_channels(f_t, self.head_w.shape[1]), self.head_w,
                                     _as_channels(f_s, self.student_head.in_features), self.student_head.weight)
        return {"diswot_semantic": p.semantic_weight * semantic,
                "diswot_relation": p.relation_weight * relation_loss(f_t, f_s),
                "kd": p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature),
                "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}
