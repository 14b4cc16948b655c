"""minseg's exception types."""


class CheckpointError(ValueError):
    """Raised for every refusal to read or convert a checkpoint (missing, corrupt, hostile, wrong architecture)."""
