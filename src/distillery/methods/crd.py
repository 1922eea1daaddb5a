"""Contrastive representation distillation (CRD) with its memory bank of negatives.

Tian, Krishnan, Isola (2020), "Contrastive Representation Distillation", ICLR.  Two learnable
heads embed the student's and the teacher's features into a shared, L2-normalised space of
``feat_dim``.  A memory bank keeps one embedding per training sample and per model, updated
with momentum each time the sample is seen; the student's embedding of a sample must pick out the
teacher's memory of the same sample among ``num_negatives`` memories of other samples (and vice
versa), through the NCE loss of :func:`distillery.losses.relations.crd_nce_loss`.  The bank is
method state (buffers, checkpointed with the run), addressed by ``ModelOutput.index``, the
training row of each sample.

Differences from the authors' code, and why:

* The bank grows to the largest row index seen (new rows get CRD's random initialisation), since
  a method is not told the training-set size; the engine's first batch is a random draw from the
  whole set, so the bank reaches nearly full size at once.  Z = n * mean(scores) and P_n = 1/n
  enter the loss only as their ratio, so n itself does not change the loss.
* Negatives are drawn uniformly with replacement, once per batch and shared by its rows (one
  (K, d) matrix product instead of a (B, K, d) gather: CRD's K = 16384 stays cheap); the
  authors' sampler draws per row.  Their CIFAR loader draws negatives from other classes only;
  here, as in their memory's own uniform sampler, a negative may share the anchor's class.
* Under multi-process training each process updates the rows of its own shard (the bank is not
  all-gathered).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses import relations as R
from distillery.methods import register
from distillery.methods.align import default_pairs
from distillery.methods.base import Method, Params
from distillery.methods.feature import LayerPair
from distillery.methods.relation import embedding


class CRDParams(Params):
    pairs: list[LayerPair] | None = Field(None, max_length=1, description="One layer pair; default: the deepest stage of zoo models.")
    feat_dim: int = Field(128, ge=1, description="Width of the shared embedding space (128 in the paper).")
    num_negatives: int = Field(16384, ge=1, description="Negatives drawn from the memory bank per batch (16384 in the paper).")
    nce_temperature: float = Field(0.07, gt=0, description="tau of the critic (0.07 in the paper).")
    momentum: float = Field(0.5, ge=0, lt=1, description="Momentum of the memory update (0.5 in the paper's code).")
    crd_weight: float = Field(0.8, ge=0, description="beta of the paper's code (0.8 in its CIFAR-100 runs).")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(0.0, ge=0, description="Optional Hinton KD term (CRD+KD in the paper).")
    temperature: float = Field(4.0, gt=0, description="Temperature of the optional KD term.")


@register("crd", params=CRDParams, paper="Tian et al. 2020, Contrastive Representation Distillation")
class CRD(Method):
    """Contrastive representation distillation: NCE against a per-sample memory bank of negatives."""

    def __init__(self, params, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        p = params
        if p.pairs:
            self.pair = (p.pairs[0].student, p.pairs[0].teacher)
        else:
            self.pair = default_pairs(student, teacher_layers, 1)[0]
        self.student_taps, self.teacher_taps = [self.pair[0]], [self.pair[1]]
        self.embed_s: nn.Module = nn.Identity()  # replaced in setup, once the widths are known
        self.embed_t: nn.Module = nn.Identity()
        # One row per training sample, grown on demand; Z negative: not estimated yet.
        self.register_buffer("memory_s", torch.empty(0, p.feat_dim))
        self.register_buffer("memory_t", torch.empty(0, p.feat_dim))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def setup(self, student_out, teacher_out):
        s, t = self._vectors(student_out, teacher_out)
        self.embed_s = nn.Linear(s.shape[1], self.params.feat_dim)
        self.embed_t = nn.Linear(t.shape[1], self.params.feat_dim)

    def _vectors(self, student_out, teacher_out):
        return (embedding(student_out.features[self.pair[0]], "pool"),
                embedding(teacher_out.features[self.pair[1]], "pool").float())

    def _grow(self, rows: int) -> None:
        """Give the bank ``rows`` rows; new ones are initialised as CRD's memory is (uniform in
        +-1/sqrt(d/3): norm ~1).  Drawn on the CPU generator, which checkpoints save."""
        have, d = self.memory_s.shape
        if rows <= have:
            return
        stdv = 1.0 / math.sqrt(d / 3)
        for name in ("memory_s", "memory_t"):
            new = torch.rand(rows - have, d).mul_(2 * stdv).sub_(stdv)
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, new.to(old.device, old.dtype)]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The saved bank may be larger than this fresh one: take its size before loading.
        for name in ("memory_s", "memory_t"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        index = student_out.index
        if index is None:
            raise ValueError("CRD's memory bank needs the training row of each sample (ModelOutput.index)")
        self._grow(int(index.max()) + 1)  # one host sync per step, as in the authors' code
        n = self.memory_s.shape[0]
        s, t = self._vectors(student_out, teacher_out)
        es = F.normalize(self.embed_s(s).float(), dim=1)
        et = F.normalize(self.embed_t(t).float(), dim=1)
        neg = torch.randint(n, (p.num_negatives,)).to(index.device)
        # Student anchor against the teacher's memory (positive: the same sample's row), and the
        # symmetric term; CRD sums the two.  Indexing copies the rows, so the in-place memory
        # update below leaves this step's graph intact.
        scores_s = R.crd_scores(es, self.memory_t[index], self.memory_t[neg], temperature=p.nce_temperature)
        scores_t = R.crd_scores(et, self.memory_s[index], self.memory_s[neg], temperature=p.nce_temperature)
        # Z is estimated on the first training batch and then kept (as CRD does).
        z_s = torch.where(self.z_s > 0, self.z_s, R.crd_normaliser(scores_s, n))
        z_t = torch.where(self.z_t > 0, self.z_t, R.crd_normaliser(scores_t, n))
        crd = R.crd_nce_loss(scores_s, z=z_s, n_data=n) + R.crd_nce_loss(scores_t, z=z_t, n_data=n)
        if self.training:
            self.z_s, self.z_t = z_s, z_t
            with torch.no_grad():
                for memory, e in ((self.memory_s, es), (self.memory_t, et)):
                    mixed = p.momentum * memory[index] + (1 - p.momentum) * e.to(memory.dtype)
                    memory.index_copy_(0, index, F.normalize(mixed, dim=1))
        terms = {"crd": p.crd_weight * crd, "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)
        return terms
