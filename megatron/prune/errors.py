"""The one exception a user sees: bad input, refused with a message that names the value and the valid choices."""


class PruneError(ValueError):
    """A user-facing error: bad input, detected before anything is written."""
