"""A weight-free per-channel encoder of classic image descriptors (``morphology``).

No download, deterministic, plain torch (batched; runs on a GPU when given
one).  Every stain plane (float in [0, 1], already rescaled by its field's or
its plate's percentiles, see :data:`napari_cellclip.images.NORMALIZATIONS`) is
first resampled once to
a ``size × size`` working image (area averaging; default 256, i.e. ~2.1 native
px per working px for the 540 px LINCS fields), then described by ``D = 128``
numbers, in this order:

==========  ====  ===========================================================
block       n     what
==========  ====  ===========================================================
intensity   13    mean, std, skewness, kurtosis (excess, tanh-squashed /4),
                  quantiles 1 5 10 25 50 75 90 95 99 %
coverage    4     fraction of pixels above 0.1, 0.25, 0.5, 0.75
histogram   16    16-bin intensity histogram (fractions)
pyramid     45    9 per octave × 5 octaves of a Gaussian pyramid (σ = 1, 2, 4,
                  8, 16 working px): gradient-magnitude energy, bright/dark
                  LoG (blob) energy, Hessian eigenvalue energies (bright blob,
                  bright ridge, dark blob), band (DoG) energy, low-pass std,
                  structure-tensor coherence (fibrous vs isotropic texture)
peaks       5     density of bright blob centres (−LoG local maxima above a
                  threshold) per octave — a cell / nucleus / granule count proxy
granularity 16    grey-opening granularity spectrum (CellProfiler
                  MeasureGranularity style) on a ``size/2`` image, square
                  structuring elements of radius 1 2 3 4 5 6 8 10 12 16,
                  plus the residual; 5 closing (dark-granule) spectrum values
                  at radius 1 2 4 8 16
local       29    local-window texture: mean local std and local
                  coefficient of variation in 5/9/17 px windows (6); std and
                  range of the 4×4 grid of block means (spatial
                  heterogeneity, 2); density of local maxima brighter than
                  the 90 % quantile (1); co-occurrence-style RMS contrast and
                  autocorrelation at offsets 1, 2, 4, 8 px in x and y (16);
                  sqrt mean |I − Gaussian(I)| at σ = 1, 2 (fine detail, 2);
                  normalised histogram entropy (1); share of the intensity
                  mass in the brightest 10 % of pixels (1)
==========  ====  ===========================================================

Energies are square-rooted (variance-stabilised) so all features are O(0.01–1).
The layout is fixed; :data:`FEATURE_NAMES` lists it, and ``MorphologyEncoder.dim``
is ``len(FEATURE_NAMES) == 128``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .base import ChannelEncoder, FieldPrep

_VERSION = "morph-v1"
QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
COVERAGE = (0.1, 0.25, 0.5, 0.75)
N_BINS = 16
N_OCTAVES = 5
OPEN_RADII = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
CLOSE_RADII = (1, 2, 4, 8, 16)
LOCAL_WINDOWS = (5, 9, 17)
COOC_OFFSETS = (1, 2, 4, 8)
PEAK_THRESHOLD = 0.02
_EPS = 1e-6


def _names() -> list[str]:
    names = ["mean", "std", "skew", "kurt"] + [f"q{int(q * 100):02d}" for q in QUANTILES]
    names += [f"cover>{t}" for t in COVERAGE]
    names += [f"hist{i:02d}" for i in range(N_BINS)]
    for o in range(N_OCTAVES):
        s = 2**o
        names += [f"s{s}_{k}" for k in ("grad", "log_bright", "log_dark", "hess_blob", "hess_ridge",
                                        "hess_dark", "band", "lowpass_std", "coherence")]
    names += [f"peaks_s{2**o}" for o in range(N_OCTAVES)]
    names += [f"gran_open_r{r}" for r in OPEN_RADII] + ["gran_residual"]
    names += [f"gran_close_r{r}" for r in CLOSE_RADII]
    names += [f"localstd_w{w}" for w in LOCAL_WINDOWS] + [f"localcv_w{w}" for w in LOCAL_WINDOWS]
    names += ["grid_std", "grid_range", "maxima_frac"]
    for d in COOC_OFFSETS:
        names += [f"contrast_x{d}", f"contrast_y{d}", f"corr_x{d}", f"corr_y{d}"]
    names += ["detail_s1", "detail_s2", "hist_entropy", "top10_mass"]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(_names())


def _gauss_kernel(sigma: float) -> list[float]:
    radius = max(1, int(math.ceil(3 * sigma)))
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-radius, radius + 1)]
    total = sum(k)
    return [v / total for v in k]


def _filter_1d(x: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    """Correlate along ``dim`` (-1 or -2) with a short symmetric kernel, reflect padding.

    Written as a sum of shifted slices: for one-channel planes this is several
    times faster on the CPU than a (1, k) convolution and exactly batch-invariant.
    """
    r = len(weights) // 2
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    n = x.shape[dim]
    xp = F.pad(x, pad, mode="reflect" if r < n else "replicate")
    out = xp.narrow(dim, r, n) * weights[r]
    for i in range(r):
        out = out + (xp.narrow(dim, i, n) + xp.narrow(dim, 2 * r - i, n)) * weights[i]
    return out


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gauss_kernel(sigma)
    return _filter_1d(_filter_1d(x, k, -1), k, -2)


def _box(x: torch.Tensor, w: int) -> torch.Tensor:
    k = [1.0 / w] * w
    return _filter_1d(_filter_1d(x, k, -1), k, -2)


def _sliding_max(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Max over the window [-r, r] along ``dim`` (out-of-image = -inf), O(log r) ops."""
    k = 2 * r + 1
    n = x.shape[dim]
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    cur = F.pad(x, pad, value=float("-inf"))
    width = 1
    while width * 2 <= k:
        length = cur.shape[dim] - width
        cur = torch.maximum(cur.narrow(dim, 0, length), cur.narrow(dim, width, length))
        width *= 2
    return torch.maximum(cur.narrow(dim, 0, n), cur.narrow(dim, k - width, n))


def _derivatives(g: torch.Tensor):
    p = F.pad(g, (1, 1, 1, 1), mode="replicate")
    c = p[:, :, 1:-1, 1:-1]
    gx = 0.5 * (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2])
    gy = 0.5 * (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1])
    gxx = p[:, :, 1:-1, 2:] - 2 * c + p[:, :, 1:-1, :-2]
    gyy = p[:, :, 2:, 1:-1] - 2 * c + p[:, :, :-2, 1:-1]
    gxy = 0.25 * (p[:, :, 2:, 2:] - p[:, :, 2:, :-2] - p[:, :, :-2, 2:] + p[:, :, :-2, :-2])
    return gx, gy, gxx, gyy, gxy


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _std(x: torch.Tensor) -> torch.Tensor:
    f = x.flatten(1)
    mu = f.mean(1, keepdim=True)
    return ((f - mu) ** 2).mean(1).sqrt()


def _erode(x: torch.Tensor, r: int) -> torch.Tensor:
    return -_dilate(-x, r)


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    return _sliding_max(_sliding_max(x, r, -1), r, -2)


def working_image(planes: torch.Tensor, size: int) -> torch.Tensor:
    """Planes ``(N, 1, H, W)`` resampled to the ``size × size`` working image: area averaging
    (bilinear for planes smaller than ``size``); unchanged when already that size."""
    if planes.shape[-2:] == (size, size):
        return planes
    if min(planes.shape[-2:]) >= size:
        return F.interpolate(planes, size=(size, size), mode="area")
    return F.interpolate(planes, size=(size, size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ResizePrep(FieldPrep):
    """Rescales the whole field and resamples it to the encoder's working image in the worker."""

    size: int = 256

    def shape(self, x: np.ndarray) -> np.ndarray:
        return working_image(torch.from_numpy(x)[:, None], self.size)[:, 0].numpy()


def _intensity(x: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Intensity, coverage and histogram blocks, and the statistics later blocks reuse."""
    n, flat = x.shape[0], x.flatten(1)
    mean = flat.mean(1)
    cent = flat - mean[:, None]
    var = (cent**2).mean(1)
    std = var.sqrt()
    skew = (cent**3).mean(1) / (std**3 + _EPS)
    kurt = (cent**4).mean(1) / (var**2 + _EPS) - 3.0
    srt = flat.sort(dim=1).values
    m = srt.shape[1]
    qidx = torch.tensor([min(m - 1, int(round(q * (m - 1)))) for q in QUANTILES], device=x.device)
    quant = srt[:, qidx]
    bins = (flat * N_BINS).long().clamp_(0, N_BINS - 1)
    hist = torch.zeros(n, N_BINS, device=x.device, dtype=x.dtype).scatter_add_(1, bins, torch.ones_like(flat)) / m
    feats = [mean[:, None], std[:, None], torch.tanh(skew / 4)[:, None], torch.tanh(kurt / 4)[:, None], quant,
             torch.stack([(flat > t).float().mean(1) for t in COVERAGE], 1), hist]
    return feats, {"mean": mean, "var": var, "quant": quant, "hist": hist, "sorted": srt}


def _octave(level: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One octave of the pyramid: its 9 filter-bank values, its blob-peak density, the next level."""
    g = _blur(level, 1.0)
    gx, gy, gxx, gyy, gxy = _derivatives(g)
    grad = (gx**2 + gy**2).sqrt()
    log = gxx + gyy
    disc = ((gxx - gyy) ** 2 + 4 * gxy**2).sqrt()
    l1 = 0.5 * (log + disc)  # larger eigenvalue
    l2 = 0.5 * (log - disc)  # smaller eigenvalue
    band = level - g
    jxx, jyy, jxy = _blur(torch.cat([gx * gx, gy * gy, gx * gy], 1), 1.5).unbind(1)
    tr = jxx + jyy
    coh_num = ((jxx - jyy) ** 2 + 4 * jxy**2).sqrt()
    coherence = coh_num.flatten(1).sum(1) / (tr.flatten(1).sum(1) + _EPS)
    bank = torch.stack([
        _mean(grad), _mean(F.relu(-log)), _mean(F.relu(log)),
        _mean(F.relu(-l1)), _mean(F.relu(-l2)), _mean(F.relu(l2)),
        _mean(band.abs()), _std(g), coherence,
    ], 1)
    resp = -log
    is_max = (resp == _dilate(resp, 1)) & (resp > PEAK_THRESHOLD)
    # density per (working px at octave 0)^2 × 1000, comparable across octaves
    peaks = is_max.flatten(1).float().sum(1) * 1000.0 / float(size * size)
    return bank, peaks, F.avg_pool2d(g, 2)


def _pyramid(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Gaussian pyramid filter bank (energies square-rooted) and blob-peak densities."""
    level, pyr, peaks = x, [], []
    for _ in range(N_OCTAVES):
        bank, pk, level = _octave(level, size)
        pyr.append(bank)
        peaks.append(pk)
    pyr_t = torch.cat(pyr, 1)
    # energies → sqrt (variance-stabilising); coherence and std are already O(1)
    energy_mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0] * N_OCTAVES, dtype=torch.bool, device=x.device)
    return [torch.where(energy_mask, pyr_t.clamp_min(0).sqrt(), pyr_t), torch.log1p(torch.stack(peaks, 1))]


def _spectrum(img: torch.Tensor, radii) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Mass removed by grey openings with growing squares (fractions), what is left, and the total."""
    total = img.flatten(1).sum(1) + _EPS
    prev, out = total, []
    for r in radii:
        mass = _dilate(_erode(img, r), r).flatten(1).sum(1)
        out.append((prev - mass).clamp_min(0) / total)
        prev = torch.minimum(prev, mass)
    return out, prev, total


def _granularity(x: torch.Tensor) -> torch.Tensor:
    """Granularity spectrum: openings (bright granules) and closings (dark granules) of the half image."""
    half = F.avg_pool2d(x, 2)
    bright, rest, total = _spectrum(half, OPEN_RADII)
    dark, _, _ = _spectrum(1.0 - half, CLOSE_RADII)  # closing of x == 1 - opening of (1 - x)
    return torch.stack(bright + [rest / total] + dark, 1).sqrt()


def _local_texture(x: torch.Tensor, st: dict) -> list[torch.Tensor]:
    """Local-window texture, spatial heterogeneity, co-occurrence contrast/autocorrelation, detail."""
    n = x.shape[0]
    lstd, lcv = [], []
    x2 = x * x
    for w in LOCAL_WINDOWS:
        mu = _box(x, w)
        sd = (_box(x2, w) - mu**2).clamp_min(0).sqrt()
        lstd.append(_mean(sd))
        lcv.append(_mean(sd / (mu + 0.05)))
    grid = F.adaptive_avg_pool2d(x, 4).flatten(1)
    maxima = (x == _dilate(x, 1)) & (x > st["quant"][:, 6:7, None, None].view(n, 1, 1, 1))
    cooc = []
    for d in COOC_OFFSETS:  # order: contrast_x, contrast_y, corr_x, corr_y per offset
        pairs = ((x[:, :, :, :-d], x[:, :, :, d:]), (x[:, :, :-d, :], x[:, :, d:, :]))
        cooc += [((p - q) ** 2).flatten(1).mean(1).sqrt() for p, q in pairs]
        cooc += [(_mean(p * q) - st["mean"] ** 2) / (st["var"] + _EPS) for p, q in pairs]  # whole-image moments
    hist, srt = st["hist"], st["sorted"]
    entropy = -(hist * hist.clamp_min(1e-12).log()).sum(1) / math.log(N_BINS)
    top = srt[:, int(0.9 * srt.shape[1]):].sum(1) / (srt.sum(1) + _EPS)
    return [
        torch.stack(lstd + lcv, 1),
        torch.stack([_std(grid), grid.max(1).values - grid.min(1).values, maxima.flatten(1).float().mean(1) * 10.0], 1),
        torch.stack(cooc, 1),
        torch.stack([_mean((x - _blur(x, 1.0)).abs()).sqrt(), _mean((x - _blur(x, 2.0)).abs()).sqrt(),
                     entropy, top], 1),
    ]


def morphology_features(planes: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Descriptors of grayscale planes ``(N, 1, H, W)`` in [0, 1] → ``(N, 128)`` float32 (module doc)."""
    x = working_image(planes.float(), size).clamp(0.0, 1.0)
    feats, stats = _intensity(x)
    feats += _pyramid(x, size)
    feats.append(_granularity(x))
    feats += _local_texture(x, stats)
    return torch.nan_to_num(torch.cat(feats, 1), nan=0.0, posinf=0.0, neginf=0.0)


class MorphologyEncoder(ChannelEncoder):
    """Weight-free classic descriptors per stain plane; ``dim == 128`` (see module doc).

    Parameters
    ----------
    device : str
        ``auto | cuda | mps | cpu``.
    size : int
        Working size every plane is resampled to (default 256).
    """

    autocast = False  # statistics need float32; the encoder is cheap anyway

    def __init__(self, device="auto", size: int = 256):
        super().__init__(device)
        self.size = int(size)
        if self.size < 64:
            from ..errors import CellClipError

            raise CellClipError(f"morphology working size must be >= 64 px, got {size}")
        self.spec = "morphology"
        self.dim = len(FEATURE_NAMES)
        self.feature_names = FEATURE_NAMES
        self.identity = f"{_VERSION}|size={self.size}|D={self.dim}"

    def field_prep(self, stains=None, *, low: float = 1.0, high: float = 99.9) -> ResizePrep:
        """Rescale the whole field and resample it to the working size in the worker."""
        return ResizePrep(low, high, self.size)

    def _encode_planes(self, planes: torch.Tensor) -> torch.Tensor:
        return morphology_features(planes, self.size)
