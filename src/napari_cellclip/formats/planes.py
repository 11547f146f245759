"""How a stack becomes the single plane per stain that the encoders and napari see.

Cell Painting encoders are trained on one 2-D image per stain and field.  Files that
hold more than that are reduced the same way in every format (OME-TIFF, OME-Zarr):

* **T** (time points): the first one.  A Cell Painting screen is fixed cells; several
  time points mean a live-cell file, and only its first frame is used.
* **Z** (focal planes): the maximum-intensity projection.  Cell Painting stacks are a
  few planes around focus, and the projection keeps each structure's in-focus signal
  (CellProfiler's MakeProjection "Maximum", the usual choice for widefield stacks).

:func:`describe_reduction` words the message that :func:`napari_cellclip.plates.read_plate`
gives when a plate has such stacks.
"""

from __future__ import annotations

import numpy as np

from ..errors import ImageReadError


def to_plane(data: np.ndarray, axes: str) -> np.ndarray:
    """Reduce ``data`` with ``axes`` (any of ``T``, ``Z`` followed by ``YX``) to a 2-D plane."""
    data = np.asarray(data)
    axes = axes.upper()
    if len(axes) != data.ndim or axes[-2:] != "YX" or set(axes[:-2]) - set("TZ"):
        raise ValueError(f"cannot reduce an array of shape {data.shape} with axes {axes!r} to a plane")
    if "T" in axes:
        data = np.take(data, 0, axis=axes.index("T"))
        axes = axes.replace("T", "")
    if "Z" in axes:
        data = data.max(axis=axes.index("Z")) if data.shape[axes.index("Z")] > 1 else data.squeeze(axes.index("Z"))
    return data


def check_channel(path, channel: int | None, n_channels: int) -> int:
    """The 0-based channel to read from an image with ``n_channels`` (None: its only channel)."""
    if channel is None:
        if n_channels != 1:
            raise ImageReadError(path, f"the image has {n_channels} channels; say which one (Frame_Orig<Stain>)")
        return 0
    if not 0 <= int(channel) < n_channels:
        raise ImageReadError(path, f"channel index {channel} out of range (the image has {n_channels} channels)")
    return int(channel)


def describe_reduction(n_t: int, n_z: int) -> str | None:
    """A sentence saying how T and Z are reduced, or None when the images are single planes."""
    parts = []
    if n_z > 1:
        parts.append(f"{n_z} Z planes per channel: the encoders and napari see their maximum-intensity projection")
    if n_t > 1:
        parts.append(f"{n_t} time points: only the first is read")
    return "; ".join(parts) or None
