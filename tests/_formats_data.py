"""Write the bundled LINCS fields in the formats real screens come in (for the format tests).

Every writer stores the same pixels (the 8-bit sample scaled to 16 bit, ×257, as a
JUMP/Phenix camera would give) under plate name SQ00015198, so the bundled platemap
annotates them and their embeddings can be compared with the PNG original.  The
OME-Zarr plates are written with ome-zarr-py's own writer, the TIFFs with tifffile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_cellclip.images import load_field
from napari_cellclip.plates import read_plate
from napari_cellclip.sample import sample_plate_dir

PLATE = "SQ00015198"
STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
#: channel names as microscopes and Harmony write them (mapped by the dye vocabulary)
DYE_NAMES = ("HOECHST 33342", "Concanavalin A", "SYTO 14", "Phalloidin/WGA", "MitoTracker Deep Red")
#: the Bray / CLOOME file names of the same five stains
BRAY_NAMES = ("Hoechst", "ERSyto", "ERSytoBleed", "Ph_golgi", "Mito")

HARMONY_XML = """<?xml version="1.0" encoding="utf-8"?>
<EvaluationInputData xmlns="http://www.perkinelmer.com/PEHH/HarmonyV5">
  <Plates><Plate><PlateID>{plate}</PlateID></Plate></Plates>
  <Maps><Map>{entries}</Map></Maps>
</EvaluationInputData>
"""


def sample_fields():
    """[(well, site, (5, H, W) uint16)] of the bundled plate, in table order."""
    df = read_plate(sample_plate_dir())
    return [(r["Metadata_Well"], int(r["Metadata_Site"]), load_field(r, STAINS).astype(np.uint16) * 257)
            for _, r in df.iterrows()]


def _row_col(well: str) -> tuple[int, int]:
    return ord(well[0]) - 64, int(well[1:])


def write_phenix(dst: Path, compression="lzw", fields=None, names=DYE_NAMES, compressionargs=None) -> Path:
    """A Harmony export: ``<plate>/Images/rXXcYYfZZp01-chNsk1fk1fl1.tiff`` + ``Index.idx.xml``."""
    import tifffile

    images = dst / PLATE / "Images"
    images.mkdir(parents=True)
    for well, site, img in fields or sample_fields():
        r, c = _row_col(well)
        for ch, plane in enumerate(img, start=1):
            tifffile.imwrite(images / f"r{r:02d}c{c:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff", plane,
                             compression=compression, compressionargs=compressionargs)
    if names:
        entries = "".join(f'<Entry ChannelID="{i}"><ChannelName>{n}</ChannelName></Entry>'
                          for i, n in enumerate(names, start=1))
        (dst / PLATE / "Index.idx.xml").write_text(HARMONY_XML.format(plate=PLATE, entries=entries))
    return dst / PLATE


def write_ome_tiffs(dst: Path, fields=None, names=DYE_NAMES, axes="CYX", pixel_size=0.656) -> Path:
    """One OME-TIFF per field, ``<plate>/<well>_s<site>.ome.tiff``, channel names in the OME-XML."""
    import tifffile

    folder = dst / PLATE
    folder.mkdir(parents=True)
    for well, site, img in fields or sample_fields():
        data = img
        if axes == "ZCYX":  # two planes; the second brighter, so a projection is visible
            data = np.stack([img // 2, img])
        meta = {"axes": axes, "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size}
        if names:
            meta["Channel"] = {"Name": list(names)}
        tifffile.imwrite(folder / f"{well}_s{site}.ome.tiff", data, metadata=meta, compression="zlib")
    return folder


def write_ome_zarr(dst: Path, version: str = "0.4", fields=None, names=DYE_NAMES, levels: int = 2) -> Path:
    """An OME-Zarr HCS plate written by ome-zarr-py (NGFF 0.4 on zarr v2, 0.5 on zarr v3)."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    fields = fields or sample_fields()
    path = dst / f"{PLATE}.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    wells = sorted({w for w, _, _ in fields})
    rows = sorted({w[0] for w in wells})
    cols = sorted({str(int(w[1:])) for w in wells}, key=int)
    write_plate_metadata(root, rows, cols, [f"{w[0]}/{int(w[1:])}" for w in wells], fmt=fmt, name=PLATE)
    omero = None
    if names:
        omero = {"channels": [{"label": n, "color": "FFFFFF", "window": {"start": 0, "end": 65535, "min": 0,
                                                                        "max": 65535}} for n in names]}
    for well in wells:
        group = root.require_group(well[0]).require_group(str(int(well[1:])))
        sites = [(s, img) for w, s, img in fields if w == well]
        write_well_metadata(group, [{"path": str(k)} for k in range(len(sites))], fmt=fmt)
        for k, (_, img) in enumerate(sites):
            kwargs = {"omero": omero} if omero else {}
            write_image(img, group.require_group(str(k)), axes="cyx", fmt=fmt,
                        scale_factors=tuple(2 ** i for i in range(1, levels)), scale={"y": 0.656, "x": 0.656},
                        axes_units={"y": "micrometer", "x": "micrometer"}, **kwargs)
    return path


def write_dye_folders(dst: Path, fields=None, names=BRAY_NAMES) -> Path:
    """Bray / CLOOME style: ``<plate>/<well>_s<site>/Hoechst.tif, ERSyto.tif, …`` (one TIFF per stain)."""
    import tifffile

    for well, site, img in fields or sample_fields():
        folder = dst / PLATE / f"{well}_s{site}"
        folder.mkdir(parents=True)
        for name, plane in zip(names, img):
            tifffile.imwrite(folder / f"{name}.tif", plane, compression="lzw")
    return dst / PLATE
