"""Exception types. Every message says what is wrong and what to change.

They subclass the built-in exception a caller would naturally catch (``ValueError``,
``FileNotFoundError``, ``KeyError``) so code written for Hugging Face PEFT keeps working.
The CLI turns any :class:`DeltatuneError` into one line and exit code 2.
"""

from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of all errors deltatune raises on purpose."""


class ConfigError(DeltatuneError, ValueError):
    """An adapter config holds a value that cannot work (``r <= 0``, an unknown ``peft_type``...)."""


class MixedBatchTypeError(ConfigError, TypeError):
    """A mixed-adapter batch (``adapter_names``) reached a module that cannot run one adapter per row (LoRA on
    ``nn.MultiheadAttention``, a ``modules_to_save`` copy of a GRU...). A ``TypeError`` too, as PEFT raises."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field of the wrong type (a string where a list is needed); a ``TypeError`` too, as PEFT raises."""


class TargetModuleError(DeltatuneError, ValueError):
    """``target_modules`` matched nothing, or matched a layer type the method cannot adapt."""


class AdapterNameError(DeltatuneError, KeyError, ValueError):
    """An adapter name that is already taken, that does not exist, or that is not a valid name (a path, a dot,
    empty, or the reserved ``"__base__"``)."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class AdapterLoadError(DeltatuneError, ValueError):
    """An adapter file that is missing, corrupt, or does not fit the base model."""


class AdapterFileNotFoundError(AdapterLoadError, FileNotFoundError):
    """The adapter directory or one of its files does not exist."""


class DiskFullError(DeltatuneError, OSError):
    """The device ran out of space (or quota) while deltatune wrote ``path``; the temporary file is removed and
    the file that was there before is unchanged. ``errno`` is ``ENOSPC`` (or ``EDQUOT``), ``filename`` the path."""

    def __init__(self, path: str, errno_: int | None = None) -> None:
        import errno as _errno

        message = (f"no space left on device writing {path}; the previous file is unchanged; free space or choose "
                   "another directory")
        super().__init__(errno_ or _errno.ENOSPC, message, path)

    def __str__(self) -> str:  # OSError would print "[Errno 28] <message>: '<path>'"
        return self.strerror


class MergeError(DeltatuneError, ValueError):
    """A merge that would break the model (NaN/Inf weights) or that the method's math does not allow."""


class ConfigKeysError(AdapterLoadError, TypeError):
    """An ``adapter_config.json`` without the keys every adapter config has (``peft_type``): some other JSON file,
    not an adapter's. A ``TypeError`` too, because that is what PEFT raises there (``PeftConfig.from_peft_type``)."""


# PEFT's names for the same classes (``peft.PeftError``, ``peft.NoMatchingPeftModuleError``), so that an
# ``except`` clause written for PEFT catches deltatune's errors.
PeftError = DeltatuneError
NoMatchingPeftModuleError = TargetModuleError
