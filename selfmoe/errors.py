"""User-facing errors.

Every problem a user can fix (bad config, missing file, offline hub access) is raised as a
:class:`SelfMoEError` whose message names the problem and the fix; the CLI prints it without a
traceback and exits non-zero. Asserts are kept for invariants of our own code.
"""


class SelfMoEError(Exception):
    """An error the user can fix; the message says how."""


class ConfigError(SelfMoEError):
    """Invalid configuration: unknown key, bad type, failed cross-field check."""


class DataError(SelfMoEError):
    """A missing, empty or malformed data/seed file."""


class OfflineError(SelfMoEError):
    """Something needed the Hugging Face hub while it is unreachable or disabled."""
