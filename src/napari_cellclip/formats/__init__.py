"""The file layouts a plate comes in, each behind :func:`napari_cellclip.plates.read_plate`.

* :mod:`.numbered` — per-channel images numbered by channel: Phenix / Harmony (with its
  ``Index.idx.xml``), ImageXpress (with its ``.HTD``, or one folder per dye as in the Bray
  data), and multi-channel TIFFs with a file-name pattern;
* :mod:`.ome_tiff` — one OME-TIFF per field (channels, pixel size, plate position from its OME-XML);
* :mod:`.ome_zarr` — OME-Zarr HCS plates, NGFF 0.4 (zarr v2) and 0.5 (zarr v3);
* :mod:`.dye_folders` — one folder per field of images named by dye (Bray / CLOOME);
* :mod:`.dyes` — the dye vocabulary that turns channel / file names into stain names;
* :mod:`.planes` — how T and Z stacks become the one plane per stain the encoders see.

Each layout module reads its files and builds its rows with the table helpers of
:mod:`napari_cellclip.plates` (which recognises the layout and dispatches to it).  Every
layout ends as rows of the LoadData-form fields table (``FileName_Orig<Stain>``,
``PathName_Orig<Stain>``, ``Frame_Orig<Stain>`` = channel index in the file), so the
feature cache, the pipeline job, training and the napari widgets take any of them alike;
:func:`napari_cellclip.images.read_image` decodes a channel whatever holds it.
"""
