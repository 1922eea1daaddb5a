"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""


class DistilleryError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(DistilleryError):
    pass


class DataError(DistilleryError):
    pass


class ModelError(DistilleryError):
    pass


class CheckpointError(DistilleryError):
    pass


class DivergenceError(DistilleryError):
    """A loss term became NaN/inf; the message names the term and the step."""


class RunDirExistsError(DistilleryError):
    pass
