"""Errors a user can fix: the CLI prints them as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input: a file, key, rank or value that the message names, with what to do about it."""


class ConfigError(UserError, ValueError):
    """A configuration or sweep file that does not validate."""


class DataError(UserError, ValueError):
    """A data file (TIFF, manifest, records) that is corrupt, truncated or inconsistent."""
