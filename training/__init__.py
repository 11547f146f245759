"""Training, feature extraction and evaluation of CellCLIP: ``python -m training fit|extract|evaluate``.

Modules, in the order a fit uses them: :mod:`training.config` (the validated ``fit`` options),
:mod:`training.data` (the training fields, well bags, prompt-aware batch samplers, plate splits),
:mod:`training.prepare` (features from the shared feature engine, correction, bags),
:mod:`training.train` (set-up, epochs, checkpoints, validation), with :mod:`training.optim`,
:mod:`training.scheduler`, :mod:`training.precision`, :mod:`training.distributed` and
:mod:`training.checkpoints`; :mod:`training.evaluate` (retrieval metrics and reports, through the
plugin's towers); :mod:`training.loop` (the entry points ``fit`` / ``extract`` / ``evaluate``);
:mod:`training.baseline` (the naive global-descriptor nearest-centroid baseline).
"""
