"""DistillNearest / DistillWeighted: distil features from source models of *similar tasks*.

Borup, Phoo & Hariharan (2023), "Distilling from Similar Tasks for Transfer Learning on a Budget"
(arXiv 2304.12314).  The sources were trained on other tasks (other label sets); the target task
has few labels.  The relevance of each source to the target is estimated once, without
fine-tuning any source, from its frozen features of labelled target samples
(:func:`distillery.losses.similar_tasks.knn_similarity`: leave-one-out kNN accuracy).  The
student then learns the target with label cross-entropy plus feature distillation:

- ``distill_nearest``: from the most similar source only (one-hot weights);
- ``distill_weighted``: from every source, weighted by ``softmax(similarity / temperature)``.

Each source s gets a learned linear projector ``P_s`` from the student's embedding to source s's
embedding (their widths and spaces differ); the projectors belong to this method (trained and
checkpointed with the student, not exported), and the student's own head reads the unprojected
embedding.

The sources are the members of a teacher ensemble, tapped one by one::

    teacher: {ensemble: [{run: runs/src-a}, {run: runs/src-b}, {run: runs/src-c}]}
    method: {name: distill_weighted, params: {num_sources: 3}}

reads ``members.0.head:input`` ... ``members.2.head:input``; with ``num_sources: 1`` a single
(non-ensemble) teacher is tapped at ``head:input``, which is plain feature distillation from that
teacher.  The ensemble's combined logits are never used (they mean nothing across label sets).
Current limit of the engine: members of an ensemble must predict the same number of classes, so
sources trained on label sets of different sizes cannot be combined yet (see the report on this
method for the engine change that lifts it).

When the estimate happens: ``Method.setup`` sees a probe batch without its labels, so the
similarities are estimated on the *first ``estimate_batches`` training batches* (shuffled,
labelled; 1 by default), during which the student trains on CE alone; then they are frozen in
buffers -- a resumed run keeps them, and in a distributed run each process's scores are averaged
so that all use the same weights.  With few labels, ``estimate_batches`` = one epoch's steps uses
(nearly) the whole labelled target set, as the paper does.  They are reported by
``log_values`` as ``similarity_<i>`` and ``weight_<i>``.

Differences from the paper, and why:
- The paper's full text was not available while this was written; its abstract states that the
  methods need only the sources' features and pseudo-labels.  Pseudo-label (source-logit) terms
  are not implemented: the sources' label sets differ from the target's and from each other,
  and feature distillation alone is what the issue asked for.
- Similarity is estimated on the first training batches, not on a separate pass over the whole
  labelled target set (a method only sees batches): set ``estimate_batches`` to cover it.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.similar_tasks import knn_similarity, source_weights, weighted_feature_loss
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params
from distillery.methods.nd import sum_over_processes
from distillery.methods.relation import embedding

_PAPER = "Borup, Phoo & Hariharan 2023, Distilling from Similar Tasks for Transfer Learning on a Budget"


class NearestParams(Params):
    num_sources: int = Field(1, ge=1, description="Number of source models: the members of `teacher.ensemble` "
                                                  "(1: a single, non-ensemble teacher).")
    source_layer: str = Field("head:input", description="Tap of each source's embedding, inside its ensemble member.")
    student_embedding: str = Field("head:input", description="Tap giving the student's embedding.")
    feature_weight: float = Field(1.0, ge=0, description="Weight lambda of the feature-distillation term.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
    distance: Literal["cosine", "mse"] = Field("cosine", description="Feature distance between the projected student "
                                                                     "embedding and each source's embedding.")
    k: int = Field(5, ge=1, description="Neighbours of the leave-one-out kNN similarity estimate.")
    estimate_batches: int = Field(1, ge=1, description="Training batches the similarity is estimated on (the feature "
                                                       "term starts after them; CE alone trains meanwhile).")


class WeightedParams(NearestParams):
    temperature: float = Field(0.1, gt=0, description="Softmax temperature over the similarities (kNN accuracies in "
                                                      "[0, 1]): lower sharpens towards the nearest source.")


class _SimilarTasks(Method):
    temperature: float | None = None  # None: one-hot on the most similar source (DistillNearest)

    def __init__(self, params: NearestParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        n = params.num_sources
        self.student_taps = [params.student_embedding]
        self.teacher_taps = ([params.source_layer] if n == 1
                             else [f"members.{i}.{params.source_layer}" for i in range(n)])
        self.projectors = nn.ModuleList()
        # Buffers: checkpointed, so a resumed run keeps the weights chosen at its first step.
        self.register_buffer("similarity", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("weights", torch.zeros(n, dtype=torch.float64))  # 0 until estimated: CE alone
        self.register_buffer("estimated", torch.zeros((), dtype=torch.bool))

    def _source_features(self, teacher_out: ModelOutput | None) -> list[torch.Tensor]:
        if teacher_out is None:
            raise ValueError("no source models: give them as `teacher: {ensemble: [{run: ...}, ...]}` "
                             "(or one `teacher: {run: ...}` with num_sources: 1)")
        missing = [t for t in self.teacher_taps if t not in teacher_out.features]
        if missing:
            raise ValueError(f"source features {missing} were not captured; num_sources must equal the number of "
                             "ensemble members and source_layer must name a layer of each")
        return [embedding(teacher_out.features[t], "pool") for t in self.teacher_taps]

    def setup(self, student_out, teacher_out):
        s = embedding(student_out.features[self.params.student_embedding], "pool")
        feats = self._source_features(teacher_out)
        self.projectors = nn.ModuleList(nn.Linear(s.shape[1], f.shape[1], device=s.device, dtype=s.dtype) for f in feats)
        # The labelled samples of the estimate, collected over the first estimate_batches batches
        # (the probe batch has the training batch size).  Buffers, so that a run interrupted while
        # collecting resumes with what it had; fixed shapes, so that checkpoints load.
        rows = self.params.estimate_batches * s.shape[0]
        for i, f in enumerate(feats):
            self.register_buffer(f"bank_{i}", torch.zeros(rows, f.shape[1], dtype=torch.float64, device=f.device))
        self.register_buffer("bank_labels", torch.zeros(rows, dtype=torch.long, device=s.device))
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long, device=s.device))

    @torch.no_grad()
    def collect(self, source_features: list[torch.Tensor], targets: torch.Tensor) -> None:
        """Add a labelled batch to the estimate's samples; estimate once they are complete."""
        start, rows = int(self.bank_filled), self.bank_labels.shape[0]
        take = min(rows - start, targets.shape[0])
        for i, f in enumerate(source_features):
            getattr(self, f"bank_{i}")[start:start + take] = f[:take].detach().double()
        self.bank_labels[start:start + take] = targets[:take]
        self.bank_filled += take
        if int(self.bank_filled) == rows:
            self.estimate([getattr(self, f"bank_{i}") for i in range(len(source_features))], self.bank_labels)

    @torch.no_grad()
    def estimate(self, source_features: list[torch.Tensor], targets: torch.Tensor) -> None:
        """Score every source on these labelled samples and fix the weights (once)."""
        sims = torch.stack([knn_similarity(f, targets, k=self.params.k) for f in source_features])
        sims = sum_over_processes(sims.to(self.similarity.device, self.similarity.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sims /= torch.distributed.get_world_size()
        self.similarity.copy_(sims)
        self.weights.copy_(source_weights(sims, temperature=self.temperature))
        self.estimated.fill_(True)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        feats = self._source_features(teacher_out)
        if not bool(self.estimated) and self.training:
            if progress.epoch >= 1:  # a second pass would put duplicates among each sample's neighbours
                raise ValueError(f"estimate_batches={p.estimate_batches} is more than one epoch's steps; lower it "
                                 "(or raise data.train_subset)")
            self.collect(feats, targets)
        # Before the estimate the weights are 0 (CE alone), not uniform: DistillNearest must not
        # distil from a source it has not chosen.  Every projector still runs (zero gradient).
        s = embedding(student_out.features[p.student_embedding], "pool")
        projected = [proj(s) for proj in self.projectors]
        return {"feature": p.feature_weight * weighted_feature_loss(projected, feats, self.weights, kind=p.distance),
                "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}

    def log_values(self) -> dict[str, float]:
        if not bool(self.estimated):
            return {}
        out = {f"similarity_{i}": float(v) for i, v in enumerate(self.similarity)}
        out.update({f"weight_{i}": float(v) for i, v in enumerate(self.weights)})
        return out


@register("distill_nearest", params=NearestParams, teacher_same_classes=False, paper=_PAPER)
class DistillNearest(_SimilarTasks):
    """DistillNearest: CE plus feature distillation from the source most similar to the target task."""

    temperature = None


@register("distill_weighted", params=WeightedParams, teacher_same_classes=False, paper=_PAPER)
class DistillWeighted(_SimilarTasks):
    """DistillWeighted: CE plus feature distillation from all sources, weighted by softmax(task similarity / T)."""

    def __init__(self, params: WeightedParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.temperature = params.temperature
