"""Frozen transformers vision models as per-channel encoders (``hf:<id or dir>``).

Each stain plane is a grayscale image.  A vision model trained on RGB expects
``(rgb - mean_rgb) / std_rgb`` with ``rgb = (g, g, g)``.  Since the first layer
(the patch embedding) is a linear, unpadded convolution, the replication and the
normalisation fold exactly into a one-channel convolution::

    W1 = Σ_c W_c / std_c
    b1 = b − Σ_c (mean_c / std_c) · Σ_{kh,kw} W_c

so the model runs on ``(N, 1, S, S)`` planes (3× less input traffic, no
normalisation pass).  Models whose first conv is padded (zero padding breaks the
fold) use the explicit replicate-and-normalise path instead.

Crops: a field is cut into ``n_crops = k×k`` crops of the model's input size
``S`` (``crop_size`` of ``preprocessor_config.json``, 224 for DINOv2) on a
centred grid: when ``k·S`` fits in the field, the tiles are adjacent and centred
(no overlap, no resampling, the native pixel size the model sees); otherwise
they are spread evenly from edge to edge (overlapping) to cover the whole field.
The default ``k = 2`` (4 crops) covers the central 448×448 px (69 %) of a
540×540 LINCS field without overlap at 4 forwards per plane; ``n_crops=9``
covers all of it (overlapping) at 2.25× the cost.  Fields smaller than ``S`` are
upsampled (bilinear) to ``S``.  The pooled output (DINOv2: the layer-normed CLS
token, ``pooler_output``) of the crops is averaged per plane.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._fsutil import file_digest
from ..errors import CellClipError, warn_at_caller
from .base import ChannelEncoder, FieldPrep

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_N_CROPS = 4
_VERSION = "hf-v1"


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", source))
        or source.count("/") > 1
        or "\\" in source
    )


def _read_preprocessor(source: str, local: bool, revision: str | None) -> dict | None:
    if local:
        p = Path(source) / "preprocessor_config.json"
        if not p.is_file():
            return None
        path = p
    else:
        try:
            from transformers.utils import cached_file

            path = cached_file(
                source,
                "preprocessor_config.json",
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:  # noqa: BLE001 - any hub failure → fall back with a warning
            path = None
        if path is None:
            return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        warn_at_caller(f"could not read {path}: {exc}; using defaults")
        return None
    return data if isinstance(data, dict) else None


def _input_size(pre: dict | None, config) -> int:
    def _side(v):
        if isinstance(v, int):
            return v
        if isinstance(v, dict):
            for k in ("height", "shortest_edge", "width"):
                if isinstance(v.get(k), int):
                    return v[k]
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
            return v[0]
        return None

    if pre:
        for key in ("crop_size", "size"):
            s = _side(pre.get(key))
            if s:
                return int(s)
    s = getattr(config, "image_size", None)
    s = _side(s) if not isinstance(s, int) else s
    return int(s or 224)


def _find_first_conv(model: nn.Module, in_channels: int):
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return name, module
            return None  # the first conv does not take RGB: do not touch it
    return None


def fold_rgb_conv(conv: nn.Conv2d, mean, std) -> nn.Conv2d:
    """The 1-channel conv equal to ``conv`` on ``((g,g,g) - mean) / std``.

    Exact for convolutions without padding (patch embeddings).
    """
    w = conv.weight.detach().double()  # (O, 3, kh, kw)
    mean_t = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    w1 = (w / std_t).sum(dim=1, keepdim=True)
    shift = (w * (mean_t / std_t)).sum(dim=(1, 2, 3))
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=0,
        dilation=conv.dilation, groups=1, bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w1.to(conv.weight.dtype))
        new.bias.copy_((b - shift).to(conv.weight.dtype))
    new.requires_grad_(False)
    return new


def crop_starts(length: int, size: int, k: int) -> list[int]:
    """Where the ``k`` crops of ``size`` px start along an axis of ``length`` px (≥ ``size``):
    adjacent and centred when ``k·size`` fits, else spread evenly from edge to edge.

    The one definition of the crop geometry: :func:`crop_grid` cuts these crops and
    :class:`CropPrep` keeps only the span they cover.
    """
    if k == 1:
        return [(length - size) // 2]
    if k * size <= length:
        off = (length - k * size) // 2
        return [off + i * size for i in range(k)]
    return [round(i * (length - size) / (k - 1)) for i in range(k)]


def crop_grid(x: torch.Tensor, size: int, n_crops: int) -> torch.Tensor:
    """``(N, 1, H, W)`` → ``(N, n_crops, 1, size, size)`` on a centred k×k grid (see module doc)."""
    k = math.isqrt(n_crops)
    n, c, h, w = x.shape
    if min(h, w) < size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        h, w = nh, nw
    ys, xs = crop_starts(h, size, k), crop_starts(w, size, k)
    crops = [x[:, :, y : y + size, x0 : x0 + size] for y in ys for x0 in xs]
    return torch.stack(crops, dim=1)


@dataclass(frozen=True)
class CropPrep(FieldPrep):
    """Keeps (and rescales) only the span of the ``grid × grid`` crops of ``size`` px
    (:func:`crop_starts`); a field smaller than a crop is kept whole (it is upsampled later)."""

    size: int = 224
    grid: int = 2

    def region(self, h: int, w: int) -> tuple[slice, slice]:
        if min(h, w) < self.size:
            return slice(0, h), slice(0, w)
        ys, xs = crop_starts(h, self.size, self.grid), crop_starts(w, self.size, self.grid)
        return slice(ys[0], ys[-1] + self.size), slice(xs[0], xs[-1] + self.size)


def _check_n_crops(n_crops) -> int:
    try:
        n_crops = int(n_crops)
    except (TypeError, ValueError):
        raise CellClipError(f"n_crops must be a square number (1, 4, 9, ...), got {n_crops!r}") from None
    if n_crops < 1 or math.isqrt(n_crops) ** 2 != n_crops:
        raise CellClipError(f"n_crops must be a square number (1, 4, 9, ...), got {n_crops}")
    return n_crops


def _resolve_source(source: str) -> tuple[str, str | None, bool]:
    """``(folder or hub id, revision, is a local folder)`` of an ``hf:`` spec's source."""
    revision, src = None, source
    expanded = os.path.expanduser(source)
    local = os.path.isdir(expanded)
    if not local and "@" in source and not _looks_like_path(source):
        src, revision = source.rsplit("@", 1)
    if local:
        src = str(Path(expanded).resolve())
        if not (Path(src) / "config.json").is_file():
            raise CellClipError(
                f"image encoder folder {source!r} has no config.json; expected a folder written by "
                "transformers save_pretrained (config.json + model.safetensors)"
            )
    elif _looks_like_path(source) or os.path.exists(expanded):
        raise CellClipError(
            f"image encoder folder {source!r} does not exist (or is not a folder); give a folder written "
            "by transformers save_pretrained or a Hugging Face hub id such as 'facebook/dinov2-small'"
        )
    return src, revision, local


def _mean_std(pre: dict | None, spec: str) -> tuple[tuple, tuple]:
    """The RGB normalisation of the preprocessor config (ImageNet's, with a warning, without one)."""
    mean = std = None
    if pre is not None:
        mean, std = pre.get("image_mean"), pre.get("image_std")
    if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std)
            and len(mean) in (1, 3)):
        warn_at_caller(f"{spec}: no usable image_mean/image_std in preprocessor_config.json; using ImageNet "
                       "statistics")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if len(mean) == 1:
        mean, std = tuple(mean) * 3, tuple(std) * 3
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if any(s <= 0 for s in std):
        raise CellClipError(f"{spec}: image_std must be positive, got {std}")
    return mean, std


def _fold_first_conv(model: nn.Module, mean, std) -> bool:
    """Replace an unpadded RGB patch embedding by its 1-channel fold (:func:`fold_rgb_conv`) in place;
    returns whether it did."""
    found = _find_first_conv(model, 3)
    if found is None or tuple(found[1].padding) not in ((0, 0), (0,)) or found[1].groups != 1 \
            or found[1].padding_mode != "zeros":
        return False
    name, conv = found
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], fold_rgb_conv(conv, mean, std))
    for m in model.modules():
        if getattr(m, "num_channels", None) == 3:
            m.num_channels = 1
    return True


class HFEncoder(ChannelEncoder):
    """A frozen transformers vision model applied to each stain plane.

    Parameters
    ----------
    source : str
        Hub id (``"facebook/dinov2-small"``, optionally ``"@<revision>"``) or a
        local folder written by ``save_pretrained`` (safetensors weights).
    device : str
        ``auto | cuda | mps | cpu``.
    n_crops : int
        Number of crops per plane, a square number (1, 4, 9, …); default 4.
    max_batch : int
        Most crops per forward call (bounds memory); all planes of a batch are
        still encoded together, chunked only above this size.
    fold : bool
        Fold replication + normalisation into a 1-channel patch embedding (default).
    """

    autocast = True

    def __init__(self, source: str, device="auto", n_crops: int = DEFAULT_N_CROPS, max_batch: int = 256,
                 fold: bool = True):
        super().__init__(device)
        self.n_crops = _check_n_crops(n_crops)
        self.max_batch = max(1, int(max_batch))
        self.spec = f"hf:{source}"
        src, revision, local = _resolve_source(source)
        self.source, self.revision = src, revision

        model = self._load_model(src, revision, local)
        config = model.config
        if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
            model = model.vision_model  # e.g. CLIP: keep the image tower only
            config = model.config
        pre = _read_preprocessor(src, local, revision)
        self.image_mean, self.image_std = _mean_std(pre, self.spec)
        self.input_size = _input_size(pre, config)
        # fold the grey→RGB replication + normalisation into the first conv
        self.folded = fold and _fold_first_conv(model, self.image_mean, self.image_std)

        model.eval().requires_grad_(False)
        # under bf16/fp16 autocast the weights live in that dtype too: half the memory of a giant
        # model, and no per-forward cast of every weight (normalisations still run in fp32)
        wdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.model = model.to(self.device, dtype=wdtype)
        #: pad every forward to ``max_batch`` crops (set for ``torch.compile(dynamic=False)``: one graph)
        self.fixed_batch = False
        self._mean = torch.tensor(self.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.image_std, device=self.device).view(1, 3, 1, 1)
        dim = getattr(config, "hidden_size", None)
        if not isinstance(dim, int):
            with torch.inference_mode(), self._autocast_context():
                dim = int(self._forward_crops(torch.zeros(1, 1, self.input_size, self.input_size,
                                                          device=self.device)).shape[-1])
        self.dim = int(dim)
        weights = self._weights_id(src, local, revision, config)
        self.identity = (
            f"{_VERSION}|{weights}|size={self.input_size}|crops={self.n_crops}"
            f"|mean={','.join(f'{v:.6g}' for v in self.image_mean)}"
            f"|std={','.join(f'{v:.6g}' for v in self.image_std)}"
        )

    def field_prep(self, stains=None, *, low: float = 1.0, high: float = 99.9) -> CropPrep:
        """Rescale only the span of this encoder's crop grid (see :class:`CropPrep`)."""
        return CropPrep(low, high, self.input_size, math.isqrt(self.n_crops))

    # -- loading ------------------------------------------------------------
    def _load_model(self, src: str, revision: str | None, local: bool):
        try:
            from transformers import AutoModel
        except ImportError as exc:  # pragma: no cover - dependency
            raise CellClipError(f"transformers is needed for {self.spec}: {exc}") from None
        kwargs = {"revision": revision} if revision else {}
        last = None
        for attn in ("sdpa", None):
            kw = dict(kwargs)
            if attn:
                kw["attn_implementation"] = attn
            try:
                return AutoModel.from_pretrained(src, use_safetensors=True, **kw)
            except (ValueError, ImportError) as exc:
                last = exc
                msg = str(exc).lower()
                if attn and ("attn" in msg or "sdpa" in msg or "attention" in msg):
                    continue  # the architecture has no SDPA attention: load the default
                break
            except OSError as exc:
                last = exc
                break
            except Exception as exc:  # noqa: BLE001 - report any loader failure as a user error
                last = exc
                break
        where = "folder" if local else "hub id"
        raise CellClipError(
            f"could not load image encoder {self.spec!r} ({where}): {type(last).__name__}: "
            f"{str(last).strip().splitlines()[0] if str(last).strip() else ''} — the model must be a transformers "
            "vision model with safetensors weights (a hub id needs network access or a filled HF cache)"
        ) from None

    @staticmethod
    def _weights_id(src: str, local: bool, revision: str | None, config) -> str:
        if local:
            folder = Path(src)
            files = sorted(
                p for p in folder.iterdir()
                if p.is_file() and (p.suffix == ".safetensors"
                                    or p.name in ("config.json", "model.safetensors.index.json"))
            )
            digest = hashlib.blake2b(digest_size=16)
            for p in files:
                digest.update(p.name.encode())
                digest.update(file_digest(p).encode())
            return f"dir:{digest.hexdigest()}"  # content only: a moved copy keeps its cache
        commit = getattr(config, "_commit_hash", None)
        return f"hub:{src}@{revision or 'main'}:{commit or 'unknown'}"

    # -- forward -----------------------------------------------------------
    def _forward_crops(self, crops: torch.Tensor) -> torch.Tensor:
        if not self.folded:
            crops = (crops.expand(-1, 3, -1, -1) - self._mean) / self._std
        out = self.model(pixel_values=crops)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(-1)
        return pooled.reshape(pooled.shape[0], -1)

    def _forward_fixed(self, crops: torch.Tensor) -> torch.Tensor:
        """One forward → float32; with :attr:`fixed_batch`, zero-padded to ``max_batch`` crops first
        (a compiled model then sees one input shape, whatever the batch, and compiles once)."""
        n = crops.shape[0]
        if self.fixed_batch and n < self.max_batch:
            crops = torch.cat([crops, crops.new_zeros((self.max_batch - n,) + tuple(crops.shape[1:]))])
        return self._forward_crops(crops)[:n].float()

    def _encode_planes(self, planes: torch.Tensor) -> torch.Tensor:
        n = planes.shape[0]
        crops = crop_grid(planes, self.input_size, self.n_crops)  # (N, k, 1, S, S)
        flat = crops.reshape(n * self.n_crops, 1, self.input_size, self.input_size)
        outs = [self._forward_fixed(flat[i : i + self.max_batch]) for i in range(0, flat.shape[0], self.max_batch)]
        emb = torch.cat(outs, dim=0)
        return emb.reshape(n, self.n_crops, -1).mean(dim=1)
