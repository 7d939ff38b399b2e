"""The one error every reader, writer and join of :mod:`daunce_core.store` raises."""


class StoreError(ValueError):
    """A file does not have the layout daunce expects; the message names the file and key."""
