"""The error the Slicer side raises: one clear line naming the input it is about."""


class MAMLSegmentationError(Exception):
    """Bad input, a failed or cancelled engine run, or results that cannot be imported.

    The GUI shows ``str(error)`` in the status line and an error dialog; the console gets the
    exception. Whenever it is raised, the scene is as it was before the call.
    """


class OutOfDistributionRefusal(MAMLSegmentationError):
    """The engine refused the image: it lies outside the model's training data (exit code 3).
    The message is the engine's sentence, which names the model, the reason and the way out."""


class CancelledError(MAMLSegmentationError):
    """The user cancelled the run; the engine process tree was stopped."""
