"""The one family of user errors. Anything else that escapes a command is a bug.

Every error a user can cause and fix (a setting, a file, a dataset, a model folder, a store, an
evaluation input) is a ``DasError``; its message names the setting or file, the value and the
fix. The `das` command prints a ``DasError`` as one line and exits 2; any other exception keeps
its traceback, because it means das-pipeline itself is wrong. ``DasError`` derives from
``ValueError`` (the convention for bad input), so library callers may catch either.
"""

from __future__ import annotations


class DasError(ValueError):
    """A user-fixable problem; the message says what is wrong and how to fix it."""


class ConfigError(DasError):
    """A setting in the TOML config or on the command line is wrong."""


class DataError(DasError):
    """A dataset is missing, empty, unreadable, or does not match the model."""


class ModelError(DasError):
    """The model folder is missing, incomplete or unsupported."""


class StoreError(DasError):
    """The store does not match the config, or holds incomplete, stale or corrupt data."""


class EvalError(DasError):
    """Evaluation (LDS, counterfactual) inputs are missing, mismatched or malformed."""
