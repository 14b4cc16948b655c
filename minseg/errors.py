"""minseg's exception types."""


class CheckpointError(ValueError):
    """Raised for every refusal to read or convert a checkpoint (missing, corrupt, hostile, wrong architecture)."""


class DownloadError(CheckpointError):
    """An official checkpoint could not be fetched or verified; the message names the address and the manual route."""


class DataError(ValueError):
    """A dataset that cannot be used as it is (unknown layout, malformed json, an image without its mask, a mask
    of another size, a label out of range, an unreadable image); the message starts with the offending file."""
