"""The options of ``fit``: one validated dataclass (the command line's ``fit`` options, same names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from napari_cellclip.errors import CellClipError
from napari_cellclip.losses import LOSSES

__all__ = ["FitConfig", "FIT_DEFAULTS", "DEFAULT_OUTPUT", "PRECISIONS", "LOSSES", "RANGES", "option_type"]

DEFAULT_OUTPUT = "checkpoints/cellclip-lincs-sample"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: old keyword names fit() still takes
_ALIASES = {"num_workers": "workers"}
#: numeric option → (int or float, lowest, highest, strictly above lowest); None: no bound.  Checked by
#: FitConfig (the Python API) and by the command line (:func:`option_type`), with the same words.
RANGES = {
    "extract_batch_size": (int, 1, 1 << 20, False), "workers": (int, 0, 1024, False),
    "embed_dim": (int, 1, 16384, False), "vision_layers": (int, 0, 256, False),
    "vision_heads": (int, 1, 1024, False), "context_length": (int, 2, 8192, False),
    "epochs": (int, 1, 10**7, False), "batch_size": (int, 1, 1 << 20, False),
    "lr": (float, 0.0, None, True), "text_lr": (float, 0.0, None, True),
    "weight_decay": (float, 0.0, None, False), "warmup": (float, 0.0, None, False),
    "min_lr_ratio": (float, 0.0, 1.0, False), "grad_clip": (float, 0.0, None, False),
    "seed": (int, 0, 2**32 - 1, False), "bag_min_fields": (int, 0, None, False),
    "bag_max_fields": (int, 1, None, False),
    "eps": (float, 0.0, 1.0, True), "save_every": (int, 0, None, False), "keep": (int, 0, None, False),
    "log_every": (int, 0, None, False), "eval_every": (int, 0, None, False), "stop_after_steps": (int, 1, None, False),
    "dist_timeout": (float, 0.0, None, True),
}


def option_type(name: str):
    """The argparse ``type=`` of the numeric fit option ``name`` (its :data:`RANGES`)."""
    from napari_cellclip.cli import number

    kind, lo, hi, above = RANGES[name]
    return number(kind, lo, hi, above=above)


def _check_ranges(cfg) -> None:
    from napari_cellclip.cli import check_number

    for name, (kind, lo, hi, above) in RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        try:
            setattr(cfg, name, check_number(value, kind, lo, hi, above=above))
        except ValueError as exc:
            raise CellClipError(f"--{name.replace('_', '-')}: {exc}") from None
    if cfg.bag_max_fields is not None and cfg.bag_max_fields < cfg.bag_min_fields:
        raise CellClipError(f"--bag-max-fields {cfg.bag_max_fields} is below --bag-min-fields {cfg.bag_min_fields}")


@dataclass
class FitConfig:
    """Everything ``fit`` needs; see ``python -m training fit --help`` for each option."""

    # data
    data: list | None = None
    platemap: str | None = None
    barcode_platemap: str | None = None
    annotations: str | None = None
    channel_map: str | None = None
    cell_line: str = "A549"
    val_plate: list | None = None
    cache_dir: str | None = None
    extract_batch_size: int = 8
    workers: int | None = None  # None: prepare.extract_workers decides
    features_mmap: bool = True
    # model
    output: str = DEFAULT_OUTPUT
    encoder: str = "morphology"
    normalization: str = "plate"
    text_encoder: str = "all-MiniLM-L6-v2"
    text_tuning: str = "frozen"
    loss: str = "cwcl"
    embed_dim: int = 256
    vision_layers: int = 2
    vision_heads: int = 8
    pooling: str = "attention"
    context_length: int = 77
    correction: str = "tvn"
    # optimisation
    epochs: int = 240
    batch_size: int = 64
    batching: str = "multipositive"
    lr: float = 5e-4
    text_lr: float | None = None
    weight_decay: float = 0.1
    warmup: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    dist_timeout: float = 60.0  # minutes a torchrun collective may wait for the slowest rank
    bag_min_fields: int = 1
    bag_max_fields: int | None = None
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    # checkpoints and logging
    save_every: int = 0
    keep: int = 2
    log_every: int = 1
    eval_every: int = 0
    stop_after_steps: int | None = None
    resume: bool = False
    no_progress: bool = False
    quiet: bool = False

    def __post_init__(self):
        from napari_cellclip.cli import check_output_dir
        from napari_cellclip.images import check_normalization

        from .data import BATCHINGS

        if self.precision not in PRECISIONS:
            raise CellClipError(f"unknown precision {self.precision!r}; choose auto, fp32, bf16 or fp16")
        if self.loss not in LOSSES:
            raise CellClipError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        self.normalization = check_normalization(self.normalization)
        if self.batching not in BATCHINGS:
            raise CellClipError(f"unknown batching {self.batching!r}; choose {' or '.join(BATCHINGS)}")
        _check_ranges(self)
        check_output_dir(self.output)
        if isinstance(self.val_plate, str):
            self.val_plate = [self.val_plate]
        if isinstance(self.data, (str, bytes)) or hasattr(self.data, "__fspath__"):
            self.data = [self.data]
        self.betas = tuple(self.betas)

    @classmethod
    def from_kwargs(cls, **kwargs) -> FitConfig:
        """``fit(**kwargs)``: unknown names are a TypeError; None means "the default"
        (except ``stop_after_steps``, whose default is None)."""
        for old, new in _ALIASES.items():
            if old in kwargs:
                kwargs.setdefault(new, kwargs.pop(old))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown fit option(s): {sorted(unknown)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def to_json(self) -> dict:
        """The options as recorded in the checkpoint (``config.training``) and ``train_args.json``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


#: name → default of every fit option (the command line builds its defaults from it)
FIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FitConfig)}
