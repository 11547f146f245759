"""Folders of one image per stain named by dye, one folder per field (Bray / CLOOME style).

::

    <plate>/A01_s1/Hoechst.tif  ERSyto.tif  ERSytoBleed.tif  Ph_golgi.tif  Mito.tif
    <plate>/A01/2/Hoechst.tif …                       (or a well folder, then a field folder)

A file is a channel of its folder's field when its name (without suffix) is a dye or stain
name (:mod:`.dyes`); other images in such a folder (``Brightfield.tif``) are kept as extra
channels under their own name.  Well and site come from the folder names
(:func:`napari_cellclip.plates.parse_well_site`); the plate is the folder above.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import PlateError
from ..images import IMAGE_SUFFIXES
from ..plates import DEFAULT_STAINS, _finish, _stain_names, _table_from_channels, parse_well_site
from .dyes import canonical_stain


def _field_position(folder: Path, root: Path) -> tuple[str, str, int]:
    """(plate, well, site) of a field folder ``<plate>/A01_s2/`` or ``<plate>/A01/2/``."""
    pos = parse_well_site(folder.name)
    if pos is not None:
        base = folder.parent
        well, site = pos[0], pos[1] or 1
    elif folder.name.isdigit() and parse_well_site(folder.parent.name):
        base = folder.parent.parent
        well, site = parse_well_site(folder.parent.name)[0], int(folder.name)
    else:
        raise PlateError(f"{folder}: cannot tell the well and field of this folder of dye-named images; name "
                         "field folders like 'A01_s1' (or '<well>/<field>/')")
    return base.name, well, site


def read_fields(root: Path, files: list[Path], plate) -> pd.DataFrame:
    """Field folders holding one image per stain named by dye (``Hoechst.tif`` …, Bray / CLOOME)."""
    folders = sorted({f.parent for f in files})
    all_images = [p for d in folders for p in sorted(d.iterdir())
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    order = {s: k for k, s in enumerate(DEFAULT_STAINS)}
    labels = sorted({p.stem for p in all_images}, key=lambda n: (order.get(canonical_stain(n), 99), n))
    ids = {stem: i for i, stem in enumerate(labels, start=1)}
    channel_names = _stain_names(ids.values(), None, {i: s for s, i in ids.items()}, str(root), "the file names")
    records = []
    for p in all_images:
        plate_name, well, site = _field_position(p.parent, root)
        records.append({"plate": plate or plate_name, "well": well, "site": site, "ch": ids[p.stem], "path": p})
    df = _table_from_channels(records, channel_names, str(root))
    return _finish(df, [channel_names[i] for i in sorted(channel_names)], "dye-folders")
