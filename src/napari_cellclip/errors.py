"""Error and warning types for mistakes a user can make.

Every error a user can cause (a wrong path, a corrupt image, a platemap without a
well, a checkpoint that does not fit the plate) is a :class:`CellClipError`, whose
message names the file, well or key at fault.  The napari widgets show these as
notifications; the command line prints them without a traceback.
"""

from __future__ import annotations


class CellClipError(ValueError):
    """Base class for user-facing errors."""


class PlateError(CellClipError):
    """A plate folder or manifest cannot be turned into a table of fields."""


class ImageReadError(CellClipError):
    """An image file is missing, corrupt, truncated or does not fit its field."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class CorruptFileError(CellClipError):
    """A file napari-cellclip wrote (a feature-cache entry, a job shard) fails its content checksum.

    ``unverified``: the file carries no checksum at all (written by an older version, or cut short
    before it)."""

    def __init__(self, path, message: str, *, unverified: bool = False):
        self.path, self.unverified = str(path), unverified
        super().__init__(f"{path}: {message}")


class MetadataError(CellClipError):
    """Platemap / annotation tables do not cover the fields or are malformed."""


class CheckpointError(CellClipError):
    """A checkpoint directory is missing, malformed or incompatible."""


class QueryError(CellClipError):
    """A text or image query cannot be run (empty, too long, nothing embedded)."""


class Cancelled(Exception):
    """Raised inside long jobs when the user cancelled them."""


class CellClipWarning(UserWarning):
    """Something was skipped or assumed; the message says what."""


#: modules a warning's location skips to reach the caller's line: this package, and the wrappers that
#: mutmut (mutation testing, scripts/mutation.py) puts around its functions
_INTERNAL_MODULES = ("napari_cellclip", "mutmut")


def warn_at_caller(message: str, category=CellClipWarning) -> None:
    """Warn attributed to the first caller outside this package (the user's line), however deep in
    the package it is raised."""
    import sys
    import warnings

    frame, level = sys._getframe(1), 2
    while frame is not None and str(frame.f_globals.get("__name__")).startswith(_INTERNAL_MODULES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
