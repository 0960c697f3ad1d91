"""Exceptions a user can act on: each names the file or field, what was expected and what was found."""


class Flux2Error(Exception):
    """Base class of every error flux2_core raises on purpose."""


class CheckpointError(Flux2Error):
    """A model file or folder is missing, unreadable, or not what the caller asked for."""


class IncompatibleModelsError(Flux2Error):
    """Two models that must work together do not fit (e.g. text-encoder width vs DiT context dim)."""


class Interrupted(Flux2Error):
    """Raised between sampling steps when the caller asked to stop."""
