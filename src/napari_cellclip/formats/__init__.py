"""File formats beyond plain per-channel images, each behind :func:`napari_cellclip.plates.read_plate`.

* :mod:`.dyes` — the dye vocabulary that turns channel / file names into stain names;
* :mod:`.ome_tiff` — one OME-TIFF per field (channels, pixel size, plate position from its OME-XML);
* :mod:`.ome_zarr` — OME-Zarr HCS plates, NGFF 0.4 (zarr v2) and 0.5 (zarr v3);
* :mod:`.planes` — how T and Z stacks become the one plane per stain the encoders see.

Every format ends as rows of the LoadData-form fields table (``FileName_Orig<Stain>``,
``PathName_Orig<Stain>``, ``Frame_Orig<Stain>`` = channel index in the file), so the
feature cache, the pipeline job, training and the napari widgets take any of them alike;
:func:`napari_cellclip.images.read_image` decodes a channel whatever holds it.
"""
