"""The one error type dlx raises for its own failures."""


class DlxError(ValueError):
    """Bad input or an unsupported pipeline. A ValueError, so callers can catch either."""
