"""The errors a user can fix (a config value, a data file, a checkpoint, a run directory, a full disk).

Raising ``UserError`` (or a subclass) means: the message alone tells the user what is wrong and what was expected,
so the command-line entry points print it as one ``error: ...`` line without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error whose message names the key or file, the value found and what was expected."""


class ConfigError(UserError, ValueError):
    """A config value (or command-line option) of the wrong type or outside its allowed range."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named that does not exist."""


class ExistingFileError(UserError, FileExistsError):
    """An output that already exists and is never overwritten by surprise."""


class DataError(UserError, ValueError):
    """Data whose content cannot be used as is (an undecodable image, unpaired files, mismatched sizes)."""
