"""User-facing errors: the CLI prints their message as one paragraph and exits with code 2."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A bad experiment file, override or flag."""


class DataError(UserError):
    """A data set that is missing, incomplete or malformed."""


class RunDirError(UserError):
    """A run directory that cannot be used (taken by another config, unwritable...)."""
