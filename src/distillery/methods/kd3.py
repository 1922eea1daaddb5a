"""KD^3: distil from a teacher through a webly collected, distribution-shifted pool of images.

Tang, Chen, Niu, Sugiyama & Gong (2023), "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", ICCV.  The run's training split is the web pool (its labels, if any, are
never read); the test split is the teacher's task.  Per step:

1. dynamic instance selection -- the teacher's class probabilities on the batch are combined with
   the student's vote, ``(1 - w) p_t + w p_s / max(p_s)`` (see
   :func:`~distillery.losses.kd3.combined_prediction` for why the vote), and an instance is kept when
   the combined top score reaches ``threshold`` (optionally: when both networks also agree).  The
   student's share is ``w = student_weight x a``, with ``a`` the fraction of the batch on which the
   student's top class already agrees with the teacher's: an untrained student's opinion is noise
   and gets (almost) no say, and its say grows as it learns.  Selection is redone every step, so
   an instance rejected early is used once the networks are sure of it;
2. ``kd``: Hinton KD (``T^2``-scaled) on the selected instances;
3. MixDistribution -- perturbed data with a new distribution: the per-channel mean / standard
   deviation of each instance is mixed with a random partner's (lambda ~ Beta(mix_alpha, mix_alpha)).
   ``mix_layer: input`` (default) re-styles the images themselves, so the teacher is asked for its
   answer on the perturbed images (``Method.teacher_forward``; hence ``live_teacher=True``) and the
   student is also distilled there (``kd_mix``); a module path of the student (e.g. ``features.0``)
   re-styles that layer's output in a second student pass instead (no teacher call);
4. ``contrast``: instance alignment -- symmetric InfoNCE between the student's representation
   (``embed_tap``, default its penultimate features) of the perturbed and of the original instances,
   over the selected ones, so that the representation becomes invariant to the distribution shift.

Our reading, where we could not check the paper's equations: the student's vote and its
agreement-scaled share (chosen so that the student's uncertainty cannot stall the selection; a plain
mixture ``(1 - w) p_t + w p_s`` with a fixed or time-ramped share did in our runs: an agreeing but
unsure student pushed every instance under the threshold, nothing was selected and training
stopped), the threshold on the combined top score, InfoNCE as the contrastive form, and input-level
re-styling as the default (the paper inserts MixDistribution in the student network; ``mix_layer``
does that).  Not implemented: the paper's alignment of weighted features and classifier parameters.
``log_values`` reports ``selected_fraction``, the epoch's mean share of selected instances.
"""
from __future__ import annotations


import numpy as np
import torch
from pydantic import Field

from distillery.losses.kd3 import combined_prediction, instance_contrastive, mix_distribution, select_instances, selected_kd
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress
from distillery.taps import Rewrite, Taps, resolve

INPUT = "input"


class KD3Params(Params):
    temperature: float = Field(4.0, gt=0, description="KD temperature T (terms scaled by T^2).")
    kd_weight: float = Field(1.0, ge=0, description="Weight of KD on the selected web instances.")
    threshold: float = Field(0.6, ge=0, le=1, description="Keep an instance when its combined top-class score reaches this.")
    student_weight: float = Field(0.5, ge=0, le=1, description="The student's largest share in (1 - w) p_t + w p_s; w is this "
                                                               "times the batch's teacher-student top-class agreement.")
    require_agreement: bool = Field(False, description="Also require teacher and student to predict the same class.")
    mix_layer: str = Field(INPUT, description="Where MixDistribution re-styles: 'input' (the images; the teacher "
                                              "answers on them) or a student module path (its output, student only).")
    mix_alpha: float = Field(0.1, gt=0, description="lambda ~ Beta(mix_alpha, mix_alpha) per instance (MixStyle's 0.1).")
    mix_kd_weight: float = Field(1.0, ge=0, description="Weight of KD on the re-styled images (mix_layer: input only).")
    contrast_weight: float = Field(0.1, ge=0, description="Weight of the instance-alignment (InfoNCE) term (0 = off).")
    contrast_temperature: float = Field(0.5, gt=0, description="InfoNCE temperature tau.")
    embed_tap: str | None = Field("head:input", description="Student representation aligned by the contrastive term "
                                                            "(a tap; None = the logits).")
    seed: int = Field(0, ge=0, description="Seed of the MixDistribution draws (step k draws from (seed, k)).")


def _restyled(model: torch.nn.Module, path: str, perm: torch.Tensor, lam: torch.Tensor) -> Rewrite:
    """While open, the output of ``model.<path>`` is replaced by its MixDistribution."""
    return Rewrite(model, path, lambda out: mix_distribution(out, perm.to(out.device), lam.to(out.device)))


@register("kd3", params=KD3Params, live_teacher=True,
          paper="Tang, Chen, Niu, Sugiyama & Gong 2023, Distribution Shift Matters for Knowledge Distillation "
                "with Webly Collected Images (ICCV)")
class KD3(Method):
    """KD^3: dynamic selection of web instances + KD, MixDistribution re-styling, contrastive instance alignment."""

    def __init__(self, params: KD3Params, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.student_taps = [params.embed_tap] if params.embed_tap and params.contrast_weight > 0 else []
        if params.mix_layer != INPUT:
            resolve(student, params.mix_layer)  # a typo fails here, naming the student's modules
        self.register_buffer("selected_sum", torch.zeros(()))
        self.register_buffer("selected_count", torch.zeros(()))

    def setup(self, student_out, teacher_out) -> None:
        x = student_out.inputs
        if self.params.mix_layer == INPUT and (not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point):
            raise ValueError("kd3 with mix_layer: input re-styles float input tensors; for text inputs give mix_layer "
                             "a student module path")

    def log_values(self) -> dict[str, float]:
        count = float(self.selected_count)
        value = float(self.selected_sum) / count if count else 0.0
        self.selected_sum.zero_()
        self.selected_count.zero_()
        return {"selected_fraction": value}

    def _student_view(self, x, tap: str | None):
        """Student logits (and the tapped representation, or the logits when there is no tap)."""
        if not tap:
            s = self.student_forward(x)
            return s, s
        with Taps(self._student, [tap]) as taps:
            s = self.student_forward(x)
            return s, taps.collect()[tap]

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        t, s = teacher_out.logits, student_out.logits
        agreement = (t.argmax(-1) == s.argmax(-1)).float().mean().item()
        combined = combined_prediction(t, s, p.student_weight * agreement)
        agree = {"teacher_logits": t, "student_logits": s} if p.require_agreement else {}
        mask = select_instances(combined, p.threshold, **agree)
        terms = {"kd": p.kd_weight * selected_kd(s, t, mask, temperature=p.temperature)}
        if self.training:
            self.selected_sum += mask.float().mean().to(self.selected_sum)
            self.selected_count += 1

        want_contrast = p.contrast_weight > 0
        if not (want_contrast or (p.mix_layer == INPUT and p.mix_kd_weight > 0)):
            return terms  # nothing would use the re-styled pass
        rng = np.random.default_rng([p.seed, progress.step])
        n = s.shape[0]
        perm = torch.from_numpy(rng.permutation(n)).to(s.device)
        lam = torch.from_numpy(rng.beta(p.mix_alpha, p.mix_alpha, n)).to(device=s.device, dtype=torch.float32)
        tap = p.embed_tap if want_contrast else None
        if p.mix_layer == INPUT:
            x_mix = mix_distribution(student_out.inputs, perm, lam)
            s_mix, z_mix = self._student_view(x_mix, tap)
            if p.mix_kd_weight > 0:
                t_mix = self.teacher_forward(x_mix).logits
                terms["kd_mix"] = p.mix_kd_weight * selected_kd(s_mix, t_mix, mask, temperature=p.temperature)
        else:
            with _restyled(self._student, p.mix_layer, perm, lam):
                s_mix, z_mix = self._student_view(student_out.inputs, tap)
        if want_contrast:
            z = student_out.features[tap] if tap else s
            terms["contrast"] = p.contrast_weight * instance_contrastive(
                z_mix.flatten(1), z.flatten(1), mask, temperature=p.contrast_temperature)
        return terms
