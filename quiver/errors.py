"""Errors the `quiver` command line reports to the user as one clear line."""


class QuiverError(Exception):
    """Base class: the message is shown to the user as it is, without a traceback."""

    exit_code = 1


class FetchError(QuiverError):
    """A model could not be downloaded (the package index is unreachable or refuses)."""


class CorruptModelError(QuiverError):
    """A downloaded or converted model file is damaged or not what we expect."""


class VerificationError(QuiverError):
    """A converted model loads but fails its checks (config or a short generation)."""


class ApiKeyError(QuiverError):
    """`quiver keys` could not create, find or revoke a key, or reach the key store."""
