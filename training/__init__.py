"""Training, feature extraction and evaluation of CellCLIP: ``python -m training fit|extract|evaluate``.

Modules: :mod:`training.data` (well bags, prompt-distinct batches, plate
splits), :mod:`training.loop` (optimiser, schedule, checkpoints, resume, DDP),
:mod:`training.evaluate` (retrieval metrics, reports), :mod:`training.baseline`
(the naive global-descriptor nearest-centroid baseline).
"""
