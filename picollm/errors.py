"""The one exception type for a user's mistake, and the check that raises it for a config key.

A `UserError` is bad input (a flag, path, config key, data file, checkpoint or prompt). The CLI prints
its message as one line and exits with code 2. Anything else is a bug: it propagates with its
traceback and exit code 1.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or value and the fix."""


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the recipe (lr, clipping, dtype) needs changing."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise a UserError naming config key `key` unless `condition` holds."""
    if not condition:
        raise UserError(f"config key '{key}': {message}")
