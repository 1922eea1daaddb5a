"""The one narrow interface between the training engine and every distillation method.

The engine runs the models; a method only turns their outputs into named loss terms:

    terms = method(student_out, teacher_out, targets, progress)   # dict[str, scalar tensor]

``student_out`` / ``teacher_out`` carry logits and the features captured at the taps the
method asked for (``student_taps`` / ``teacher_taps``).  The engine sums the terms, logs each
one by name, and never looks at which method it is running.  A method is an ``nn.Module`` so
that its learnable parts (projectors, auxiliary heads) and its state (schedules, kept as
buffers) are trained and checkpointed with the student.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class Params(BaseModel):
    """Base of every method's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ModelOutput:
    # None only for a teacher run stopped at its last tap (``teacher_forward(until_taps=True)``).
    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    # The batch the model saw (already augmented): set on the student's output, so that a method
    # can run the student on a second view or train a peer model on the same batch.
    inputs: object = None
    # The training-set row of each sample (set on the student's output during training): lets a
    # method keep per-sample state, e.g. CRD's memory bank.
    index: torch.Tensor | None = None


@dataclass
class Progress:
    """Where training is: lets a method schedule its weights (e.g. DKD's warm-up)."""

    epoch: float  # fractional epochs completed, e.g. 2.5
    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Subclass, declare ``Params`` and register with :func:`distillery.methods.register`."""

    student_taps: list[str]
    teacher_taps: list[str]

    def __init__(self, params: Params, *, student: nn.Module, teacher_layers: list[str] | None, num_classes: int):
        # The method never holds the teacher (its weights stay out of the optimiser and the
        # checkpoint, and a cached teacher is never built): only its stage names, for
        # automatic layer pairing.
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.student_taps = []
        self.teacher_taps = []
        # A plain reference, not a submodule: the student's weights belong to the student.
        object.__setattr__(self, "_student", student)

    def student_forward(self, inputs, *, features: bool = False, keep: tuple[str, torch.Tensor] | None = None,
                        replace: dict | None = None):
        """Run the student on other inputs (e.g. a second augmented view) and return its logits;
        gradients flow into the student as for the main forward.  ``features=True`` returns a
        :class:`ModelOutput` with the features at ``student_taps`` of this pass too; ``keep`` /
        ``replace`` edit the pass as for :meth:`teacher_forward`."""
        from contextlib import ExitStack

        from distillery.models import forward_logits
        from distillery.taps import edits

        taps = getattr(self, "_student_taps", None)
        if features and taps is None:
            raise RuntimeError(f"{type(self).__name__} asked for student features but declares no student_taps")
        with ExitStack() as stack:
            for edit in edits(self._student, keep, replace):
                stack.enter_context(edit)
            if taps is not None:
                taps.clear()
            logits = forward_logits(self._student, inputs)
        if not features:
            return logits
        return ModelOutput(logits, taps.collect(), inputs)

    def teacher_forward(self, inputs, *, grad: bool = False, until_taps: bool = False,
                        keep: tuple[str, torch.Tensor] | None = None, replace: dict | None = None) -> ModelOutput:
        """Run the (frozen) teacher on other inputs -- a mixed, augmented or masked batch the
        method made -- and return its logits and the features at ``teacher_taps``; no gradient,
        unless ``grad=True``: then gradients flow back into ``inputs`` (the teacher's weights stay
        frozen), for methods that optimise inputs against the teacher (HARD's augmentor).
        ``until_taps=True`` abandons the pass once every teacher tap has fired (``logits`` is None):
        the layers after the last tap are never run.  ``keep=(path, index)`` keeps only the tokens at
        ``index`` (B, K) of ``path``'s input (e.g. ``blocks.0``: the visible patches); ``replace=
        {path: tensor or fn}`` substitutes a module's output (e.g. a message injected mid-network).
        Only for methods registered with ``live_teacher=True`` (no cache can hold such inputs)."""
        fn = getattr(self, "_teacher_fn", None)
        if fn is None:
            raise RuntimeError(f"{type(self).__name__} called teacher_forward but no live teacher is attached: "
                               "register the method with live_teacher=True and give the run a teacher")
        # Only the edits asked for are passed on, so a plain call stays fn(inputs, grad=...).
        extra = {k: v for k, v in (("until_taps", until_taps), ("keep", keep), ("replace", replace)) if v}
        return fn(inputs, grad=grad, **extra)

    def log_values(self) -> dict[str, float]:
        """State worth watching that is not a loss term (e.g. TAID's t): the engine writes it into
        each epoch's metrics row as ``method_<name>``, without adding it to the loss."""
        return {}

    def on_train_end(self, run_dir) -> None:
        """Called once, on the main process, after the last step: write artefacts (e.g. a PNG of
        what the method learned) into ``run_dir``."""

    def eval_models(self) -> dict[str, nn.Module]:
        """Extra trainable models the method owns (e.g. the peer in mutual learning): the engine
        evaluates each on the test split and reports ``test_accuracy_<name>``."""
        return {}

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        """Called once with outputs of a probe batch, before the optimiser exists:
        build whatever depends on feature shapes (e.g. projectors)."""

    def forward(
        self,
        student_out: ModelOutput,
        teacher_out: ModelOutput | None,
        targets: torch.Tensor,
        progress: Progress,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
