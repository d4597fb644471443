"""User-facing errors.

Everything a user can get wrong (a data file, a config key, a path) raises a subclass of ``DuetError``
with a message that names the thing and says what to do. The command line prints these without a
traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DuetError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 2


class DataError(DuetError):
    """A preference-data file or row that cannot be used."""


class ConfigError(DuetError):
    """A bad configuration key or value."""


class TemplateError(DuetError):
    """A chat template that cannot be applied to a conversation."""
