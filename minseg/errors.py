"""minseg's exception types."""


class CheckpointError(ValueError):
    """Raised for every refusal to read or convert a checkpoint (missing, corrupt, hostile, wrong architecture)."""


class DownloadError(CheckpointError):
    """An official checkpoint could not be fetched or verified; the message names the address and the manual route."""
