"""Online distillation: deep mutual learning -- a cohort of students, no pretrained teacher.

Zhang, Xiang, Hospedales & Lu (2018), "Deep Mutual Learning", CVPR, eq. (1)-(4) and (9)-(10):
each of K networks minimises its own cross-entropy plus the mean KL divergence from every
peer's prediction to its own,

    L_k = CE(p_k, y) + 1/(K-1) * sum_{l != k} KL(p_l || p_k).

The student trained by the engine is network 1; the method owns the other K-1 networks (the
"peers"), so the engine trains every member with one optimiser and checkpoints them with the
student, and reports each peer's test accuracy (``test_accuracy_peer<i>``).

Choices:
- **Simultaneous update.** The paper updates the networks one after another, recomputing the
  predictions in between (Alg. 1).  We update all members in one step, each member's target
  being the peers' predictions detached from the graph -- what most public DML code does; with
  a small learning rate the two orders differ by one step of staleness.
- **Divergence.** ``divergence: kl`` is DML; ``divergence: bdkd`` replaces each KL by the
  balanced forward/reverse KL of BD-KD (Amara et al. 2023), the online method that DML is the
  baseline for.  ``temperature`` softens both sides (DML uses T = 1).
- **Multi-label data**: each KL becomes the per-label binary KL and CE the per-label binary CE.
- **Peers.** ``peer`` is a zoo spec ({arch, kwargs}); left out, each peer is a copy of the
  student's architecture re-initialised (so the cohort starts from different points).
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses import multilabel as ML
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params


class MutualParams(Params):
    peers: int = Field(1, ge=1, le=8, description="Number of peer networks besides the student (cohort size K = peers + 1).")
    peer: dict[str, Any] | None = Field(None, description="Peer model spec {arch, kwargs}; default: the student's architecture, freshly initialised.")
    divergence: Literal["kl", "bdkd"] = Field("kl", description="kl = DML; bdkd = the balanced divergence of BD-KD.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature on both sides (scaled by T^2).")
    mimicry_weight: float = Field(1.0, ge=0, description="Weight of the mimicry term against each member's cross-entropy.")


def _reinitialised(model: nn.Module) -> nn.Module:
    peer = copy.deepcopy(model)
    for m in peer.modules():
        # deepcopy also copies hooks (e.g. the student's feature taps): the peer must not fire them
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return peer


@register("dml", params=MutualParams, needs_teacher=False, multilabel=True,
          paper="Zhang, Xiang, Hospedales & Lu 2018, Deep Mutual Learning (CVPR)")
class DeepMutualLearning(Method):
    """Deep mutual learning: the student and its peers train together, each distilling from the others."""

    def __init__(self, params: MutualParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.peer_models = nn.ModuleList()

    def setup(self, student_out: ModelOutput, teacher_out) -> None:
        from distillery.models import build_model, forward_logits
        from distillery.config import ModelSpec

        p = self.params
        x = student_out.inputs
        for _ in range(p.peers):
            if p.peer is None:
                peer = _reinitialised(self._student)
            else:
                if not isinstance(x, torch.Tensor):
                    raise ValueError("method.params.peer needs tensor inputs to infer the input shape; leave it out to copy the student")
                spec = ModelSpec.model_validate(p.peer)
                peer = build_model(spec, in_channels=x.shape[1] if x.dim() == 4 else None,
                                   num_classes=self.num_classes, input_size=tuple(x.shape[1:]) if x.dim() != 4 else tuple(x.shape[2:]))
            peer.to(student_out.logits.device).train(self._student.training)
            with torch.no_grad():
                out = forward_logits(peer, x)
            if out.shape != student_out.logits.shape:
                raise ValueError(f"peer predicts shape {tuple(out.shape[1:])}, the student {tuple(student_out.logits.shape[1:])}")
            self.peer_models.append(peer)

    def _divergence(self, s: torch.Tensor, t: torch.Tensor, multilabel: bool) -> torch.Tensor:
        T = self.params.temperature
        if multilabel:  # the multi-label form: per-label binary KL (BD-KD has none)
            if self.params.divergence != "kl":
                raise ValueError("dml on multi-label data supports divergence: kl only")
            return ML.binary_kd(s, t, temperature=T)
        return L.kd(s, t, temperature=T) if self.params.divergence == "kl" else L.bdkd(s, t, temperature=T)

    def forward(self, student_out, teacher_out, targets, progress):
        from distillery.models import forward_logits

        p = self.params
        cohort = [student_out.logits] + [forward_logits(peer, student_out.inputs) for peer in self.peer_models]
        k = len(cohort)
        multilabel = targets.dim() == student_out.logits.dim()
        terms: dict[str, torch.Tensor] = {}
        for i, logits in enumerate(cohort):
            name = "student" if i == 0 else f"peer{i - 1}"
            mimic = sum(self._divergence(logits, cohort[j].detach(), multilabel) for j in range(k) if j != i) / (k - 1)
            terms[f"ce_{name}"] = (ML.binary_cross_entropy(logits, None, targets) if multilabel
                                   else L.cross_entropy(logits, None, targets))
            terms[f"dml_{name}"] = p.mimicry_weight * mimic
        return terms

    def eval_models(self) -> dict[str, nn.Module]:
        return {f"peer{i}": m for i, m in enumerate(self.peer_models)}
