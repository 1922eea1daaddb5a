"""MDCS: more diverse experts with consistency self-distillation (Zhao et al., ICCV 2023).

MDCS trains a multi-expert network (shared backbone, one classifier per expert).  Distillery's
student has one head, so this method owns the ``experts - 1`` other experts: linear heads on
the student's penultimate features (tap ``head:input``).  Expert 0 is the student's own head,
the one that is deployed and reported as ``test_accuracy``; the average of all experts' raw
logits (MDCS's inference rule) is reported as ``test_accuracy_ensemble``.

Per step, on the engine's (weakly augmented) batch and a strong view made here:

* diversity loss: every expert's CE on its prior-shifted logits, on both views;
* consistency self-distillation: every expert's strong-view prediction is pulled towards its
  own detached weak-view prediction, on the instances it classifies correctly in the weak
  view; weighted by ``cs_weight`` and ramped in linearly over ``cs_warmup_epochs``.

The formulation follows the authors' released code (see :mod:`distillery.losses.mdcs`).
Where it differs from the paper's setting: the strong view is a tensor-level augmentation
(:func:`distillery.data.strong_augment.strong_augment`) instead of AutoAugment on PIL images;
the class prior, unless given, is the running frequency of the labels seen so far (the paper
uses the training set's class counts); and on a class-balanced training set every prior shift
is a constant, so the diversity loss reduces to the sum of the experts' plain CE -- MDCS is a
long-tailed method and its diversity comes from the prior.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from distillery.data.strong_augment import strong_augment
from distillery.losses.mdcs import consistency_self_distillation, distribution_shifted_logits, diversity_loss
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params, Progress
from distillery.taps import Taps

# Prior exponents of the authors' three experts (head-, balanced- and tail-oriented), reordered so
# that the student's own head -- the deployed one -- is the balanced expert.
_PAPER_EXPONENTS = (1.0, -0.5, 2.5)


class MDCSParams(Params):
    experts: int = Field(3, ge=1, description="Experts E, counting the student's own head; the other E-1 are linear "
                                               "heads on its penultimate features. 1 = no diversity loss (plain CE + CS).")
    prior_exponents: list[float] | None = Field(
        None, description="lambda_i per expert (the student's head first): expert i trains on logits z_i + lambda_i*log(prior). "
                          "Default: (1, -0.5, 2.5)[:E] as in the authors' code (0 for E=1); required for E > 3.")
    class_prior: list[float] | None = Field(
        None, description="Training class frequencies (any positive scale); default: running counts of the labels seen.")
    cs_weight: float = Field(0.6, ge=0, description="Weight of the consistency self-distillation term (0.6 in the authors' code).")
    cs_warmup_epochs: float = Field(5.0, ge=0, description="The CS weight ramps linearly from 0 over this many epochs.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the CS term (scaled by T^2).")
    confidence: float = Field(0.0, ge=0, lt=1, description="CIS: besides a correct weak-view prediction, require its "
                                                           "probability to reach this (0 = correctness alone, as in the authors' code).")
    feature_tap: str = Field("head:input", description="Penultimate features the extra experts read (module path of the student).")
    strong_crop: float = Field(0.125, ge=0, lt=0.5, description="Strong view: pad-crop by this fraction of the image side.")
    strong_flip: bool = Field(True, description="Strong view: random horizontal flip.")
    strong_cutout: float = Field(0.5, ge=0, le=1, description="Strong view: cutout square side, as a fraction of the shorter side.")
    strong_noise: float = Field(0.1, ge=0, description="Strong view: std of additive Gaussian noise (inputs are normalised).")
    seed: int = Field(0, ge=0, description="Seed of the strong views (view of step k is drawn from (seed, k)).")

    @model_validator(mode="after")
    def _exponents(self) -> "MDCSParams":
        if self.prior_exponents is not None and len(self.prior_exponents) != self.experts:
            raise ValueError(f"prior_exponents has {len(self.prior_exponents)} entries but experts={self.experts}")
        if self.prior_exponents is None and self.experts > len(_PAPER_EXPONENTS):
            raise ValueError(f"experts={self.experts}: give prior_exponents (one per expert)")
        if self.class_prior is not None and (not self.class_prior or min(self.class_prior) <= 0):
            raise ValueError("class_prior must list a positive frequency for every class")
        return self


class _ExpertEnsemble(nn.Module):
    """The student with all experts, predicting the mean of their raw logits (for evaluation)."""

    def __init__(self, student: nn.Module, heads: nn.ModuleList, tap: str):
        super().__init__()
        self.student, self.heads, self.tap = student, heads, tap

    def forward(self, x):
        from distillery.models import forward_logits

        with Taps(self.student, [self.tap]) as taps:
            z = forward_logits(self.student, x)
            feat = taps.collect()[self.tap].flatten(1)
        return torch.stack([z] + [h(feat) for h in self.heads]).mean(0)


@register("mdcs", params=MDCSParams, needs_teacher=False,
          paper="Zhao et al. 2023, MDCS: More Diverse Experts with Consistency Self-distillation for Long-tailed Recognition")
class MDCS(Method):
    """MDCS: diversity loss over extra expert heads + consistency self-distillation (weak -> strong view)."""

    def __init__(self, params: MDCSParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        if params.prior_exponents is not None:
            self.exponents = list(params.prior_exponents)
        else:
            self.exponents = [0.0] if params.experts == 1 else list(_PAPER_EXPONENTS[:params.experts])
        if params.class_prior is not None and len(params.class_prior) != num_classes:
            raise ValueError(f"class_prior has {len(params.class_prior)} entries but the data has {num_classes} classes")
        self.student_taps = [params.feature_tap] if params.experts > 1 else []
        self.heads = nn.ModuleList()
        # Running label counts (a buffer: checkpointed, so a resumed run sees the same prior).
        self.register_buffer("class_counts", torch.zeros(num_classes))

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        x = student_out.inputs
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"mdcs makes its strong view from image batches (N, C, H, W); got inputs {shape}")
        if self.params.experts > 1:
            dim = student_out.features[self.params.feature_tap].flatten(1).shape[1]
            for _ in range(self.params.experts - 1):
                self.heads.append(nn.Linear(dim, self.num_classes))

    def eval_models(self) -> dict[str, nn.Module]:
        return {"ensemble": _ExpertEnsemble(self._student, self.heads, self.params.feature_tap)} if len(self.heads) else {}

    def _prior(self, targets: torch.Tensor) -> torch.Tensor:
        if self.params.class_prior is not None:
            return torch.tensor(self.params.class_prior, device=targets.device)
        if self.training:
            valid = targets[targets >= 0]
            self.class_counts += torch.bincount(valid, minlength=self.num_classes).to(self.class_counts)
        return self.class_counts + 1.0  # add-one smoothing: no log(0) for a class not seen yet

    def _strong_view(self, x: torch.Tensor, step: int) -> torch.Tensor:
        p = self.params
        g = torch.Generator().manual_seed(p.seed * 2**32 + step)
        return strong_augment(x, g, crop=p.strong_crop, flip=p.strong_flip, cutout_size=p.strong_cutout,
                              noise_std=p.strong_noise)

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        strong_x = self._strong_view(student_out.inputs, progress.step)
        weak, strong = [student_out.logits], []
        if len(self.heads):
            with Taps(self._student, [p.feature_tap]) as taps:
                strong.append(self.student_forward(strong_x))
                strong_feat = taps.collect()[p.feature_tap].flatten(1)
            weak_feat = student_out.features[p.feature_tap].flatten(1)
            weak += [h(weak_feat) for h in self.heads]
            strong += [h(strong_feat) for h in self.heads]
        else:
            strong.append(self.student_forward(strong_x))

        prior = self._prior(targets)
        both_views = [torch.cat([w, s]) for w, s in zip(weak, strong)]
        dl = diversity_loss(both_views, torch.cat([targets, targets]), prior=prior, exponents=self.exponents)
        cs = sum(
            consistency_self_distillation(distribution_shifted_logits(s, prior, lam), distribution_shifted_logits(w, prior, lam),
                                          targets, temperature=p.temperature, confidence=p.confidence)
            for w, s, lam in zip(weak, strong, self.exponents)
        )
        ramp = min(progress.epoch / p.cs_warmup_epochs, 1.0) if p.cs_warmup_epochs > 0 else 1.0
        return {"ce" if p.experts == 1 else "diversity": dl, "cs": p.cs_weight * ramp * cs}
