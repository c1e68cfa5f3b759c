"""The one exception type a user sees: its message names the problem and the fix."""


class CogVXError(ValueError):
    """Bad input or a bad file. The message says what is wrong and what to do about it."""


class CheckpointError(CogVXError):
    """A model file or folder that cannot be loaded as asked (missing, truncated, another variant, pickled)."""


class CancelledError(RuntimeError):
    """Raised between steps when the host asked to stop (ComfyUI's interrupt button, Ctrl-C in the CLI)."""
