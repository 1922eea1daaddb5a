"""Training engine: one Accelerate loop for training and distillation, atomic checkpoints."""
from distillery.engine.trainer import Interrupted, RunResult, evaluate, fit, load_teacher

__all__ = ["Interrupted", "RunResult", "evaluate", "fit", "load_teacher"]
