"""SinKD: batch-wise Sinkhorn distance between student and teacher outputs, mixed with KD and CE.

Cui et al. (2024), "Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING.
The mathematics (batch-wise n x n cost, log-space Sinkhorn iterations) lives in
:func:`distillery.losses.sinkhorn.sinkhorn_kd`. The training objective mixes it as the
authors' released GLUE script does (``--distill_loss kd_anneal+saliency``)::

    L = (1 - alpha) * CE(labels) + alpha * KD_T + beta * SinKD

Differences from that script: KD here is Hinton's T^2-scaled KL at a fixed temperature (the
script anneals T linearly to 1 over the epochs and drops T^2), and ``beta`` multiplies our
mean-normalised Sinkhorn cost (uniform marginals 1/n) rather than the script's
``0.001 * sum(P * C)`` over a plan of total mass n -- i.e. our beta = their beta * 0.001 * n.
"""
from __future__ import annotations

from pydantic import Field

from distillery.losses import logits as L
from distillery.losses.sinkhorn import sinkhorn_kd
from distillery.methods import register
from distillery.methods.base import Method, Params


class SinkhornParams(Params):
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD (KL) term; labels get 1 - alpha. 0 = CE + Sinkhorn only.")
    temperature: float = Field(4.0, gt=0, description="KD temperature T (the KL term is scaled by T^2).")
    beta: float = Field(1.0, ge=0, description="Weight of the batch-wise Sinkhorn term.")
    sinkhorn_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distributions transported (2 in the authors' code).")
    epsilon: float = Field(0.1, gt=0, description="Entropic regularisation epsilon of the Gibbs kernel exp(-C/epsilon) (paper/code: 0.1).")
    iterations: int = Field(20, ge=1, description="Sinkhorn iterations, unrolled for the gradient (paper/code: 20).")


@register("sinkhorn", params=SinkhornParams,
          paper="Cui et al. 2024, Sinkhorn Distance Minimization for Knowledge Distillation (SinKD)")
class SinKD(Method):
    """SinKD: batch-wise Sinkhorn distance between output distributions, plus KD and label CE."""

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        s, t = student_out.logits, teacher_out.logits
        terms = {"sinkhorn": p.beta * sinkhorn_kd(s, t, targets, temperature=p.sinkhorn_temperature,
                                                  epsilon=p.epsilon, iterations=p.iterations)}
        if p.alpha > 0:
            terms["kd"] = p.alpha * L.kd(s, t, targets, temperature=p.temperature)
        if p.alpha < 1:
            terms["ce"] = (1 - p.alpha) * L.cross_entropy(s, None, targets)
        return terms
