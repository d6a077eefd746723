"""The one exception a user sees: bad input, refused with a message that names the value and the valid choices."""

from __future__ import annotations


class PruneError(ValueError):
    """A user-facing error: bad input, detected before anything is written."""


def check_at_least(flag: str, value: int | float | None, least: int | float, what: str = "") -> None:
    """Refuse ``flag value`` below ``least`` (None: the flag was not given); no flag takes 0 to mean its default."""
    if value is not None and value < least:
        raise PruneError(f"{flag} {value}: must be at least {least}{what}")


def json_type(value: object) -> str:
    """The JSON name of a value's type, for errors about a file's contents (null, not NoneType)."""
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
