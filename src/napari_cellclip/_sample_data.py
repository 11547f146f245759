"""napari sample data: the bundled real LINCS Cell Painting subset (plate SQ00015198).

* ``sample_plate`` — the small plate: 4 wells x 3 sites (DMSO A01/J18, orantinib A13,
  lonafarnib P13) as 5 stain layers with a slider over the 12 fields (lazy, like the reader).
* ``sample_field`` — one lonafarnib field (P13, site 1) as 5 in-memory stain layers.
"""

from __future__ import annotations

__all__ = ["sample_plate", "sample_field"]

SAMPLE_FIELD = ("P13", 1)


def sample_plate() -> list[tuple]:
    """The bundled plate, opened exactly as the reader opens it."""
    from ._reader import fields_layer_data
    from .sample import load_sample_fields, sample_plate_dir

    fields = load_sample_fields()
    return fields_layer_data(fields, str(sample_plate_dir()))


def sample_field() -> list[tuple]:
    """One field of the bundled plate (lonafarnib, well P13 site 1), decoded in memory."""
    from ._reader import fields_layer_data
    from .sample import load_sample_fields, sample_plate_dir

    fields = load_sample_fields()
    well, site = SAMPLE_FIELD
    one = fields[(fields["Metadata_Well"] == well) & (fields["Metadata_Site"].astype(int) == site)]
    if one.empty:  # pragma: no cover - bundled data changed
        one = fields.iloc[:1]
    (data, kwargs, kind), = fields_layer_data(one.reset_index(drop=True), str(sample_plate_dir()))
    import numpy as np

    kwargs = dict(kwargs, channel_axis=0, axis_labels=("y", "x"))
    for key in ("scale", "units"):  # drop the field axis
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])[1:]
    return [(np.asarray(data[0]), kwargs, kind)]  # (C, H, W): one 2-D layer per stain
