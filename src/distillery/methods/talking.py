"""Talking models: the student asks, the frozen teacher interprets and answers, the student uses the answer.

Zhao, Liu, Gui, An, Hong & Chi (2023), "Talking Models: Distill Pre-trained Knowledge to
Downstream Models via Interactive Communication", arXiv:2310.03188.  One round of the exchange
per training step (the losses and their reading of the paper: :mod:`distillery.losses.talking`):

    message   m = E(h_s)            h_s: the student's state at ``student_layer`` (its lower layers)
    response  r = T_up(m)           the teacher's layers after ``teacher_layer`` run on m, read at ``teacher_answer``
    decoded   d = D(r)              in the shape of the student's state at ``student_answer``
    use       z_d = S_up(d)         the student's layers after ``student_answer`` run on d

    loss = ce_weight CE(z_s, y) + kd_weight KD(z_s, z_t)                          (the base: Hinton KD)
         + interact_weight CE(z_d, y)                                             (L_interact)
         + message_weight |m - h_t^k|^2 + state_weight |d - sg(h_s')|^2           (L_MC, L_SC)
         + response_weight |r - a_t|^2                                            (the teacher understood)

``E`` and ``D`` are ``nn.Module`` attributes of the method, built in :meth:`setup` from the probe
batch's shapes (so they are trained by the run's optimiser and checkpointed with the student).
They map *exactly* onto the other model's layer: a CNN map (B, C, H, W), an MLP vector (B, D) and
a ViT token sequence (B, N, D) are translated into one another (:class:`Translator`), which makes
cross-family pairs (CNN teacher -> MLP or ViT student) work.

The teacher: registered ``live_teacher=True, teacher_on_batch=False`` -- the engine does not run it
on the batch; the method runs it twice per step: once plainly (no gradient: its own state at layer
k, its own answer and logits), once with its layer-k output *replaced* by the message and
``grad=True``, so gradients cross its frozen later layers into ``E`` and the student.  ``sg``: no
gradient (the teacher's states are constants anyway; the student's own state h_s' at
``student_answer`` is the decoder's target, not pulled toward the decoder's output).

What differs from the paper: its teacher has its own encoder/decoder into a shared message space;
with the teacher frozen here, that pair folds into the student's ``E`` (student -> teacher layer k)
and ``D`` (teacher answer -> student layer), so the message space is the teacher's layer-k space.
One exchange per step (the paper allows several rounds).  The response term (the teacher's answer
to the message vs its answer to the image) is this implementation's addition to the paper's three.  The base loss is Hinton KD on the
student's own prediction, so that all-zero exchange weights give exactly ``kd``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.talking import interaction_loss, message_consistency, response_consistency, state_consistency
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress

# A flattening translator holds d_in x prod(out_shape) weights; past this it is a mistake, not a design.
MAX_TRANSLATOR_PARAMS = 20_000_000


class TalkingParams(Params):
    student_layer: str | None = Field(None, description="Student module whose output is encoded into the message (the "
                                                        "student's lower layers end here); None = its middle stage.")
    teacher_layer: str | None = Field(None, description="Teacher module k whose output the message replaces (the teacher "
                                                        "interprets with the layers after it); None = its middle stage.")
    teacher_answer: str = Field("head:input", description="Teacher tap read as its answer (must come after teacher_layer).")
    student_answer: str | None = Field(None, description="Student module whose output the decoded answer replaces (its later "
                                                         "layers then run on it); None = its deepest stage.")
    interact_weight: float = Field(1.0, ge=0, description="w1: label CE of the prediction made from the decoded answer.")
    message_weight: float = Field(1.0, ge=0, description="w2: message consistency, |E(h_s) - teacher's own layer-k state|^2.")
    state_weight: float = Field(1.0, ge=0, description="w3: state consistency, |decoded answer - student's own state|^2.")
    response_weight: float = Field(1.0, ge=0, description="Teacher's answer to the message vs its answer to the image.")
    kd_weight: float = Field(0.9, ge=0, description="Base: Hinton KD on the student's own logits (T^2-scaled).")
    ce_weight: float = Field(0.1, ge=0, description="Base: label cross-entropy on the student's own logits.")
    temperature: float = Field(4.0, gt=0, description="Temperature T of the base KD term.")


def _reduce(x: torch.Tensor) -> torch.Tensor:
    """A feature as one vector per sample: spatial mean of a map, token mean of a sequence."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.mean(dim=1) if x.dim() == 3 else x


class Translator(nn.Module):
    """Maps features of shape ``(B, *src)`` to exactly ``(B, *dst)``:

    * map -> map, (C, H, W) -> (C', H', W'): resized to H' x W' (average-pooled down, bilinear up),
      then a 1x1 conv C -> C' -- the spatial layout is kept;
    * tokens -> tokens, (N, D) -> (N', D'): a linear map D -> D' per token, the sequence resampled
      to N' tokens (adaptive average over positions) when N != N';
    * vector -> vector, (D,) -> (D',): linear;
    * any other pair (e.g. an MLP vector to a CNN map): the source reduced to a vector (mean over
      space or tokens), a linear map to prod(dst) numbers, reshaped to ``dst``.
    """

    def __init__(self, src: tuple[int, ...], dst: tuple[int, ...], what: str):
        super().__init__()
        src, dst = tuple(src), tuple(dst)
        for shape, side in ((src, "from"), (dst, "to")):
            if len(shape) not in (1, 2, 3):
                raise ValueError(f"{what}: cannot translate {side} a feature of shape (B, {', '.join(map(str, shape))}); "
                                 "only vectors (B, D), token sequences (B, N, D) and maps (B, C, H, W) are supported -- "
                                 "tap another layer in method.params")
        self.src, self.dst = src, dst
        if len(src) == len(dst) == 3:
            self.mode, self.proj = "map", nn.Conv2d(src[0], dst[0], 1)
        elif len(src) == len(dst) == 2:
            self.mode, self.proj = "tokens", nn.Linear(src[1], dst[1])
        elif len(src) == len(dst) == 1:
            self.mode, self.proj = "vector", nn.Linear(src[0], dst[0])
        else:
            d_in = src[0] if len(src) in (1, 3) else src[1]
            n_out = math.prod(dst)
            if d_in * n_out > MAX_TRANSLATOR_PARAMS:
                raise ValueError(f"{what}: translating (B, {', '.join(map(str, src))}) into (B, {', '.join(map(str, dst))}) "
                                 f"needs a {d_in} x {n_out} linear map (over {MAX_TRANSLATOR_PARAMS:,} weights); "
                                 "tap a deeper (smaller) layer in method.params")
            self.mode, self.proj = "flat", nn.Linear(d_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.src:
            raise ValueError(f"Translator built for (B, {self.src}) got {tuple(x.shape)}")
        if self.mode == "map":
            size = self.dst[1:]
            if tuple(x.shape[-2:]) != size:
                smaller = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
                x = F.adaptive_avg_pool2d(x, size) if smaller else F.interpolate(x, size=size, mode="bilinear",
                                                                                 align_corners=False)
            return self.proj(x)
        if self.mode == "tokens":
            x = self.proj(x)
            if x.shape[1] != self.dst[0]:
                x = F.adaptive_avg_pool1d(x.transpose(1, 2), self.dst[0]).transpose(1, 2)
            return x
        if self.mode == "vector":
            return self.proj(x)
        return self.proj(_reduce(x)).view(x.shape[0], *self.dst)


@dataclass
class Exchange:
    """One round of talk: what the student said, what the teacher answered, how the student read it."""

    message: torch.Tensor
    response: torch.Tensor
    decoded: torch.Tensor
    teacher_logits: torch.Tensor  # the teacher's logits on the message


def _middle(layers: list[str]) -> str | None:
    return layers[(len(layers) - 1) // 2] if layers else None


@register("talking", params=TalkingParams, live_teacher=True, teacher_on_batch=False,
          paper="Zhao et al. 2023, Talking Models: Distill Pre-trained Knowledge to Downstream Models via "
                "Interactive Communication")
class Talking(Method):
    """Talking models: the student sends an encoded state, the frozen teacher interprets it and answers, the student decodes the answer."""

    def __init__(self, params: TalkingParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        s_layers = list(getattr(student, "default_feature_layers", []) or [])
        self.student_layer = params.student_layer or _middle(s_layers)
        self.student_answer = params.student_answer or (s_layers[-1] if s_layers else None)
        self.teacher_layer = params.teacher_layer or _middle(list(teacher_layers or []))
        self.teacher_answer = params.teacher_answer
        missing = [name for name, value in (("student_layer", self.student_layer), ("student_answer", self.student_answer),
                                            ("teacher_layer", self.teacher_layer)) if value is None]
        if missing:
            raise ValueError(f"cannot choose {', '.join(missing)} automatically (the model lists no default_feature_layers); "
                             f"give method.params.{missing[0]} as a module path, e.g. 'layer2'")
        for name in ("teacher_layer", "student_answer"):
            if ":" in getattr(self, name):
                raise ValueError(f"method.params.{name} '{getattr(self, name)}' must be a module path (its output is "
                                 "replaced), not a ':input' tap")
        if self.teacher_answer.partition(":")[0] == self.teacher_layer:
            raise ValueError(f"method.params.teacher_answer '{self.teacher_answer}' is the layer the message replaces; "
                             "read the answer at a later layer (default 'head:input')")
        self.student_taps = list(dict.fromkeys([self.student_layer, self.student_answer]))
        self.teacher_taps = list(dict.fromkeys([self.teacher_layer, self.teacher_answer]))
        self.encoder: Translator | None = None
        self.decoder: Translator | None = None

    @property
    def talks(self) -> bool:
        p = self.params
        return any(w > 0 for w in (p.interact_weight, p.message_weight, p.state_weight, p.response_weight))

    def setup(self, student_out, teacher_out) -> None:
        # teacher_on_batch=False: the probe carries no teacher outputs, so ask for the shapes.
        own = self.teacher_forward(student_out.inputs)
        h_s, s_ans = student_out.features[self.student_layer], student_out.features[self.student_answer]
        h_t, t_ans = own.features[self.teacher_layer], own.features[self.teacher_answer]
        self.encoder = Translator(h_s.shape[1:], h_t.shape[1:],
                                  f"encoder (student '{self.student_layer}' -> teacher '{self.teacher_layer}')")
        self.decoder = Translator(t_ans.shape[1:], s_ans.shape[1:],
                                  f"decoder (teacher '{self.teacher_answer}' -> student '{self.student_answer}')")

    def converse(self, inputs, student_state: torch.Tensor) -> Exchange:
        """Encode the student's state, let the teacher interpret it (its layers after ``teacher_layer`` run
        on the message, gradients reaching the message), decode the teacher's answer."""
        if self.encoder is None or self.decoder is None:
            raise RuntimeError("talking: setup() was not called (the engine calls it with a probe batch)")
        message = self.encoder(student_state)
        # The teacher's next layer may act in place (ReLU(inplace=True)): hand it a copy, so the message
        # used by the consistency loss stays intact for backward.
        reply = self.teacher_forward(inputs, grad=True, replace={self.teacher_layer: lambda _out: message.clone()})
        response = reply.features[self.teacher_answer]
        if torch.is_grad_enabled() and not response.requires_grad:
            raise ValueError(f"method.params.teacher_answer '{self.teacher_answer}' does not depend on the message put at "
                             f"'{self.teacher_layer}': read the answer at a layer after it (default 'head:input')")
        return Exchange(message, response, self.decoder(response), reply.logits)

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        x = student_out.inputs
        own = self.teacher_forward(x)  # the teacher's own state, answer and logits: constant targets
        terms: dict[str, torch.Tensor] = {}
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, own.logits, temperature=p.temperature)
        if p.ce_weight > 0:
            terms["ce"] = p.ce_weight * L.cross_entropy(student_out.logits, None, targets)
        if not self.talks:
            return terms

        talk = self.converse(x, student_out.features[self.student_layer])
        if p.message_weight > 0:
            terms["message"] = p.message_weight * message_consistency(talk.message, own.features[self.teacher_layer])
        if p.response_weight > 0:
            terms["response"] = p.response_weight * response_consistency(talk.response, own.features[self.teacher_answer])
        if p.state_weight > 0:
            # The student's own state is the decoder's target, not pulled toward the decoder's output: early
            # in training the decoded answer is noise, and dragging the student's state to it costs accuracy.
            own_state = student_out.features[self.student_answer].detach()
            terms["state"] = p.state_weight * state_consistency(talk.decoded, own_state)
        if p.interact_weight > 0:
            # The student's later layers run on the decoded answer in place of their own state.
            # (A copy, as for the teacher: the student's next layer may act in place.)
            decoded = talk.decoded
            logits_after = self.student_forward(x, replace={self.student_answer: lambda _out: decoded.clone()})
            terms["interact"] = p.interact_weight * interaction_loss(logits_after, targets)
        return terms
