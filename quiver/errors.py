"""Errors the `quiver` command line reports to the user as one clear line."""

from common.errors import QuiverError

__all__ = ["CorruptModelError", "FetchError", "QuiverError", "VerificationError"]


class FetchError(QuiverError):
    """A model could not be downloaded (the package index is unreachable or refuses)."""


class CorruptModelError(QuiverError):
    """A downloaded or converted model file is damaged or not what we expect."""


class VerificationError(QuiverError):
    """A converted model loads but fails its checks (config or a short generation)."""
