"""The one exception type a user sees: its message names the problem and the fix."""


class CogVXError(ValueError):
    """Bad input or a bad file. The message says what is wrong and what to do about it."""


class CheckpointError(CogVXError):
    """A model file or folder that cannot be loaded as asked (missing, truncated, another variant, pickled)."""


class CancelledError(RuntimeError):
    """Raised between steps when the host asked to stop (ComfyUI's interrupt button, Ctrl-C in the CLI)."""


# ComfyUI titles a failed node with the exception's module and name (execution.py's full_type_name), which for a
# custom node pack is its file path ("custom_nodes.ComfyUI-CogVX.cogvx_core.errors.CogVXError"). A builtins module
# makes that title just "CogVXError"; the message below it is the part a user acts on.
for _cls in (CogVXError, CheckpointError, CancelledError):
    _cls.__module__ = "builtins"
del _cls
