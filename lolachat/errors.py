"""User-facing errors.

Anything raised as a `LolachatError` is printed by the CLI as one line on stderr with a non-zero
exit code, never as a traceback. Raise it (or a subclass) for every problem a user can cause or fix.
"""


class LolachatError(Exception):
    """A problem the user can understand and act on; `str(err)` is the whole message."""

    exit_code = 1


class ModelNotFound(LolachatError):
    """An alias, repo id or path that names no model we can find."""


class BadModelFile(LolachatError):
    """A weights/adapter/tokenizer file that is missing, truncated, corrupt or of the wrong format."""


class UnsupportedArchitecture(LolachatError):
    """A model that is not Llama-family."""


class BadInput(LolachatError):
    """A bad argument or input file (empty question, binary file, ...)."""


class NetworkError(LolachatError):
    """A download source could not be reached."""


class AccessDenied(LolachatError):
    """A gated or private model the current credentials (HF_TOKEN) may not read."""


class ChecksumMismatch(BadModelFile):
    """A downloaded file whose sha256 differs from the one its source published (the file is deleted)."""


class DiskFull(LolachatError):
    """Not enough free disk space to store a model."""
