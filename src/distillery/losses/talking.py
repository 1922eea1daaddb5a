"""Talking models: the losses of one student -> teacher -> student exchange, as pure functions.

Zhao, Liu, Gui, An, Hong & Chi (2023), "Talking Models: Distill Pre-trained Knowledge to
Downstream Models via Interactive Communication", arXiv:2310.03188 (ICLR 2024 submission).  The
objective is the downstream task loss plus ``w1 L_interact + w2 L_MC + w3 L_SC`` (the method
section's final equation, p. 7, as the public ICLR reviews quote it): an interaction loss on what
the student predicts after the exchange, a message-consistency and a state-consistency term.
Only the abstract and those reviews could be read here, not the paper's equations; the
definitions below are this module's reading of the three terms (and of the teacher-side
consistency the exchange implies), stated exactly so that they can be checked and changed.

The exchange (notation of this module, one round):

    m   = E(h_s)                  the student's message: its lower-layer state h_s, encoded
    r   = T_up(m)                 the teacher interprets it: its layers after k run on m
    d   = D(r)                    the teacher's answer, decoded into the student's space
    z_d = S_up(d)                 the student uses the answer: its layers after the answer layer run on d

Every function below is a term of that objective on tensors it is given; none knows where they
came from.  The feature terms are mean squared errors over all elements (a distance between
hidden states; MSE is this module's choice).  Gradients flow into both arguments; the method
detaches what must stay a constant target (the teacher's own states).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distillery.losses import logits as L


def _mse(a: Tensor, b: Tensor, name: str) -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"{name}: the two states must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)} -- the encoder/decoder must map to the exact shape of the other model's layer")
    diff = a - b
    if diff.dtype in (torch.float16, torch.bfloat16):  # squares of half-precision states overflow
        diff = diff.float()
    return diff.pow(2).mean()


def message_consistency(message: Tensor, teacher_state: Tensor) -> Tensor:
    """``L_MC``: the student's message ``m = E(h_s)`` should read, to the teacher, like the teacher's own
    state at layer k on the same input, ``mean((m - h_t^k)^2)``.  The paper compares the two models'
    messages in a shared space; with a frozen teacher its encoder/decoder pair folds into the identity
    on layer k's space, so the comparison is made there."""
    return _mse(message, teacher_state, "message_consistency")


def response_consistency(response: Tensor, teacher_answer: Tensor) -> Tensor:
    """The teacher's interpretation of the message, ``r = T_up(m)``, against its answer on the input
    itself, ``T_up(h_t^k)``: ``mean((r - a_t)^2)``.  A message the teacher understands gets the answer
    the teacher would give to the image; this is the consistency of the teacher's response."""
    return _mse(response, teacher_answer, "response_consistency")


def state_consistency(decoded: Tensor, student_state: Tensor) -> Tensor:
    """``L_SC``: the decoded answer ``d = D(r)`` against the student's own state at the layer it
    replaces, ``mean((d - h_s')^2)``: the decoder learns to speak the student's language, so that
    the student's later layers can read the answer.  (Gradients reach both arguments; the method passes
    the student's state detached.)"""
    return _mse(decoded, student_state, "state_consistency")


def interaction_loss(logits_after: Tensor, targets: Tensor) -> Tensor:
    """``L_interact``: the downstream task loss (label cross-entropy) of the student's prediction made
    from the decoded answer, ``CE(S_up(D(T_up(E(h_s)))), y)``.  Its gradient crosses the frozen teacher
    into the encoder and the student's lower layers: the student learns to ask what helps its task."""
    return L.cross_entropy(logits_after, None, targets)
