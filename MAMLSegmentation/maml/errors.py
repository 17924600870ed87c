"""Errors the engine raises. Every message names the input it is about."""


class MAMLError(Exception):
    """Base class: the command line prints the message on one line and exits non-zero."""


class InputError(MAMLError):
    """An image, phase name or file given by the user cannot be used."""


class ModelError(MAMLError):
    """A checkpoint is missing, corrupt, or does not fit the inputs."""


class RegistrationError(MAMLError):
    """Registration failed or produced an implausible result."""


class CancelledError(MAMLError):
    """The run was cancelled by the user (callback, Ctrl-C or SIGTERM)."""


class OutOfDistributionError(MAMLError):
    """The input lies outside the model's training data (maml.domain): nothing was written. The
    command line exits with ``exit_code``."""

    exit_code = 3
