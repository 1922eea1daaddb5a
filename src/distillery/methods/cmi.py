"""MCMI: train a teacher with cross-entropy minus lambda times its conditional mutual information.

Ye et al. (2024), "Bayes Conditional Distribution Estimation for Knowledge Distillation Based
on Conditional Mutual Information", ICLR. This is a training objective for the *teacher* (no
teacher is needed to run it): the log-likelihood and the CMI I(X; Y_hat | Y) of the model's
outputs are maximised together,

    L = CE(labels) - lambda * CMI,    CMI = mean_i KL(P_{x_i} || Q_{y_i})

with Q_y the class-conditional centroid of the output probability vectors
(:mod:`distillery.losses.cmi`). A teacher trained this way is then used with any distillation
method (``teacher: {run: ...}``).

Centroids: the authors compute them with a pass over the training set and/or update them as a
moving average of class means (``Centroid.update_epoch`` / ``update_batch``). The engine hands a
method one batch at a time, so here they are a moving average of the batch class means
(``decay``), updated before the loss of each training step and kept in buffers (checkpointed with
the model). The paper fine-tunes an already trained (MLL) teacher with the MCMI objective;
training from scratch, ``warmup_epochs`` of plain CE play that part (the centroids are tracked
during the warm-up too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillery.losses import logits as L
from distillery.losses.cmi import cmi, update_centroids
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class CMIParams(Params):
    cmi_weight: float = Field(0.2, ge=0, description="lambda: the objective is CE - lambda * CMI (0 = plain CE, the MLL teacher).")
    decay: float = Field(0.9, ge=0, lt=1, description="Moving-average decay of the class centroids per step (a class's first batch sets it).")
    warmup_epochs: float = Field(1.0, ge=0, description="Epochs of plain CE before the CMI term is switched on (the paper starts from an MLL teacher).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the CE term.")


@register("cmi", params=CMIParams, needs_teacher=False,
          paper="Ye et al. 2024, Bayes Conditional Distribution Estimation for Knowledge Distillation Based on Conditional Mutual Information (MCMI)")
class MCMI(Method):
    """MCMI teacher training: CE minus lambda times the CMI of the outputs around their class centroids."""

    def __init__(self, params: CMIParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.register_buffer("centroids", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.register_buffer("seen", torch.zeros(num_classes))  # batches each class appeared in

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        z = student_out.logits
        if self.training:
            with torch.no_grad():
                probs = F.softmax(z.detach().float(), dim=-1)
                new, seen = update_centroids(self.centroids, self.seen, probs, targets, decay=p.decay)
                self.centroids.copy_(new)
                self.seen.copy_(seen)
        on = p.cmi_weight > 0 and progress.epoch >= p.warmup_epochs
        return {
            "ce": F.cross_entropy(z.float(), targets, label_smoothing=p.label_smoothing, ignore_index=L.IGNORE_INDEX),
            # logged as -lambda * CMI (the term added to the loss); 0 during the warm-up
            "cmi": -p.cmi_weight * cmi(z, targets, self.centroids) if on else z.new_zeros(()),
        }
