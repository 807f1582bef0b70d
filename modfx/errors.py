"""The one exception type modfx raises at users."""


class ModfxError(ValueError):
    """A user-facing failure: says what was found, what was expected, and what to do."""
