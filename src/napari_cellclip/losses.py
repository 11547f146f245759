"""Contrastive losses for CellCLIP: CWCL (the paper's default), CLIP, SigLIP, CLOOB.

Conventions shared by all losses
--------------------------------
* Embeddings are passed un-normalised; each loss L2-normalises them.
* ``logit_scale`` is the *log* scale, i.e. ``model.logit_scale`` itself; the
  loss clamps it to <= ln 100 and exponentiates ("clamp at use").
* ``labels`` (optional, (B,) ints): samples with equal labels are positives
  of each other (multi-positive targets), in both directions.  A batch's
  texts are its *distinct* prompts: the text embeddings of samples that share
  a label are averaged into one candidate (they are the same prompt), so a
  repeated prompt is never a negative of itself.  With labels the logits are
  (B images) x (U distinct labels):
    image->text: the target of image i is its own label (CLIP), or the
      label-aware CWCL weights below; the softmax runs over the U prompts with
      log(n_u) added to prompt u's logit, n_u its count in the batch.  That is
      the paper's softmax over all B texts, where a prompt repeated n_u times is
      n_u equal candidates: the same loss up to a constant, the same gradient.
      Without it the optimum learns the batch's prompt frequencies as a prior
      (logit_u = log p(image | u) + log n_u): on a plate with twice as many
      control wells as treated ones, every unsure field is called a control.
      With it the learned scores carry no prior, so ranking the prompts for
      an image is balanced.
    text->image: the row of label u has the uniform target over the images
      with label u; the CE is averaged over the U rows (each prompt weighs the
      same, however many wells it has).
  Without labels (or with pairwise distinct labels) U = B, every n_u = 1 and
  everything reduces to the usual diagonal-target losses.
* ``gather=True`` all-gathers embeddings, features and labels across DDP
  processes (:func:`gather_features`) and computes the loss on the global
  batch; gradients reach this process's shard only (each rank then holds the
  gradient of the global loss w.r.t. its own samples; DDP's averaging divides
  by the world size, a constant factor).  A no-op outside torch.distributed.
* Computation is in float32 (or float64 when given float64).

CWCL direction (checked against ``src/clip/methods.py`` of suinleelab/CellCLIP)
----------------------------------------------------------------------------
    L = CE(logits_text->image, targets) + L_cwcl
    L_cwcl = -(1/N) sum_i sum_j w_ij log softmax_j(s <p_i, q_j>)
with p = image embeddings, q = text embeddings (the image->text direction,
``logits_per_image`` rows), and
    w_ij = mean_c (cos(u_i^c, u_j^c) / 2 + 1/2), rows normalised to sum 1,
u the pooled per-channel frozen features (B, C, D), detached (targets carry no
gradient).  So the text->image direction gets hard (or label) targets and the
image->text direction gets continuous targets from image-image similarity.

With labels (label-aware CWCL): samples sharing a label are positives, so
their similarity weight is the maximum, w_ij = 1 when labels_i == labels_j
(as for j = i); the target of image i on the distinct prompt u is the sum of
w_ij over the batch samples j with label u, rows normalised to sum 1 -- the
mass the paper's formula puts on u's copies when a batch repeats a text --
and the softmax over the distinct prompts carries the log(n_u) term above, so
the loss is the paper's formula on the batch as drawn.  (Before the term, the
model learned the batch's prompt frequencies: leaving one LINCS plate out ×
3 seeds, 31/36 held-out wells and 199/324 fields right; with it 32/36 and
213/324.)  With pairwise distinct labels this is exactly the formula above.

CLOOB (Fürst et al. 2022; ``cloob`` in ``src/clip/methods.py`` of CellCLIP)
--------------------------------------------------------------------------
Modern-Hopfield retrieval replaces each embedding by what it retrieves from
the batch's images or texts, then InfoLOOB (leave-one-out bound: the positive
is left out of the denominator) contrasts the retrieved patterns:
    hop(S, X)_i = normalise(sum_j softmax_j(beta <s_i, x_j>) x_j)
    U_x = hop(x, x), U_y = hop(y, x)   (images and texts retrieved from images)
    V_x = hop(x, y), V_y = hop(y, y)   (images and texts retrieved from texts)
    L = tau mean_i [-k_ii + log sum_{j != i} exp k_ij],  k = (1/tau) U_x U_y^T
      + tau mean_i [-k'_ii + log sum_{j != i} exp k'_ij], k' = (1/tau) V_y V_x^T
with 1/tau = exp(logit_scale) and beta = 14.3 (``HOPFIELD_SCALE``, CellCLIP's
default, all Hopfield projections disabled as there).  With labels the texts
are the batch's distinct prompts (stored once in the text Hopfield memory);
an image's positive is its prompt, a prompt's positives are all its images
(the mean of their k'), and every positive is left out of the denominator.
A row with no negative at all (every sample of the batch shares one prompt)
has nothing to contrast and is left out of the mean.

SigLIP and CLOOB keep one candidate per distinct prompt with no count term.
SigLIP's pairs are independent sigmoids: repeating a column weighs all its
pairs alike, which moves no pair's optimum.  For CLOOB a repeated negative
prompt would enter the leave-one-out denominator once per copy; that variant
is not implemented or measured here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .devices import to_device

__all__ = [
    "LOSSES",
    "HOPFIELD_SCALE",
    "LOGIT_SCALE_MAX",
    "gather_features",
    "clip_loss",
    "cwcl_loss",
    "siglip_loss",
    "cloob_loss",
    "channel_similarity_weights",
    "target_matrix",
    "compute_loss",
]

LOGIT_SCALE_MAX = math.log(100.0)
LOSSES = ("cwcl", "clip", "siglip", "cloob")  # the names config.loss / fit --loss accept
HOPFIELD_SCALE = 14.3  # beta of CLOOB's Hopfield retrieval (CLOOB paper and CellCLIP's --scale-hopfield)


# --------------------------------------------------------------------------- DDP
def _dist_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (first dim = batch) across processes, rank order.

    The local shard keeps its autograd graph; other ranks' shards are
    constants.  Batches of different sizes on different ranks are fine.
    Returns ``x`` unchanged when torch.distributed is not initialised or has
    a single process.
    """
    dist = _dist_world()
    if dist is None:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    local = x.detach()
    if local.shape[0] < m:
        pad = local.new_zeros((m - local.shape[0],) + tuple(local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts)


def _maybe_gather(gather: bool, *tensors):
    if not gather:
        return tensors
    return tuple(None if t is None else gather_features(t) for t in tensors)


# --------------------------------------------------------------------------- helpers
def _prep(image_emb, text_emb, logit_scale):
    dtype = torch.float64 if image_emb.dtype == torch.float64 else torch.float32
    img = F.normalize(image_emb.to(dtype), dim=-1)
    txt = F.normalize(text_emb.to(dtype), dim=-1)
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=img.device, dtype=dtype)  # not via float32
    scale = logit_scale.to(device=img.device, dtype=dtype).clamp(max=LOGIT_SCALE_MAX).exp()
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be (B, E), got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    return img, txt, scale


def target_matrix(labels: torch.Tensor | None, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, n) row-stochastic targets: identity, or uniform over equal labels."""
    if labels is None:
        return torch.eye(n, device=device, dtype=dtype)
    labels = to_device(labels.reshape(-1), device)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {n}")
    same = (labels[:, None] == labels[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def _groups(labels: torch.Tensor | None, n: int, device, dtype):
    """(n, U) one-hot membership of each sample in its distinct label (identity without labels)."""
    if labels is None:
        return torch.eye(n, device=device, dtype=dtype)
    labels = labels.reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {n}")
    # on the labels' own device: CPU labels give the group count without waiting for the GPU
    uniq, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    return F.one_hot(to_device(inverse, device), uniq.shape[0]).to(dtype)


def _dedup_text(txt: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(U, E) unit text embedding per distinct label: mean of its samples' (unit) embeddings."""
    return F.normalize(member.t() @ txt, dim=-1)


def _text_to_image_targets(member: torch.Tensor) -> torch.Tensor:
    """(U, B): uniform over the images of each distinct label."""
    t = member.t()
    return t / t.sum(dim=1, keepdim=True)


def _copies(logits_per_image: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Image->text logits (B, U) plus log(count of each distinct prompt in the batch).

    The softmax over the U distinct prompts then equals the paper's softmax over all B texts of the
    batch, where a prompt repeated n times is n equal candidates: the same loss, gradient for
    gradient.  Without the term the model learns the batch's prompt frequencies as a prior
    (a control prompt on half the wells wins every unsure image).
    """
    return logits_per_image + torch.log(member.sum(dim=0))[None, :]


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum_i sum_j t_ij log softmax_j(logits_ij)."""
    return -(targets * torch.log_softmax(logits, dim=1)).sum() / logits.shape[0]


def channel_similarity_weights(channel_features: torch.Tensor, labels: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """CWCL weights from pooled per-channel features (B, C, D), no gradient.

    w_ij = mean_c (cos(u_i^c, u_j^c)/2 + 1/2), each row normalised to sum 1;
    with ``labels``, w_ij = 1 (the maximum) for samples sharing a label.
    """
    u = channel_features.detach()
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = F.normalize(u.to(dtype), dim=-1, eps=1e-8)
    C = u.shape[1]
    cos = torch.einsum("icd,jcd->ij", u, u) / C  # mean over channels
    w = cos / 2 + 0.5
    if labels is not None:
        labels = to_device(labels.reshape(-1), w.device)
        w = torch.where(labels[:, None] == labels[None, :], torch.ones_like(w), w)
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)


# --------------------------------------------------------------------------- losses
def clip_loss(image_emb, text_emb, logit_scale, *, labels=None, gather: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(image->text) + CE(text->image)) / 2."""
    image_emb, text_emb, labels = _maybe_gather(gather, image_emb, text_emb, labels)
    img, txt, scale = _prep(image_emb, text_emb, logit_scale)
    member = _groups(labels, img.shape[0], img.device, img.dtype)
    logits_per_image = scale * img @ _dedup_text(txt, member).t()  # (B, U)
    loss_i2t = _soft_ce(_copies(logits_per_image, member), member)
    loss_t2i = _soft_ce(logits_per_image.t(), _text_to_image_targets(member))
    return (loss_i2t + loss_t2i) / 2


def cwcl_loss(image_emb, text_emb, channel_features, logit_scale, *, labels=None,
              gather: bool = False) -> torch.Tensor:
    """CellCLIP's loss: CE(text->image) + CWCL(image->text, channel-similarity targets).

    channel_features: (B, C, D) pooled per-channel frozen features (detached here).
    """
    image_emb, text_emb, channel_features, labels = _maybe_gather(
        gather, image_emb, text_emb, channel_features, labels
    )
    img, txt, scale = _prep(image_emb, text_emb, logit_scale)
    if channel_features.ndim != 3 or channel_features.shape[0] != img.shape[0]:
        raise ValueError(
            f"channel_features must be (B, C, D) with B={img.shape[0]}, got "
            f"{tuple(channel_features.shape)}"
        )
    member = _groups(labels, img.shape[0], img.device, img.dtype)
    logits_per_image = scale * img @ _dedup_text(txt, member).t()  # (B, U)
    loss_cl = _soft_ce(logits_per_image.t(), _text_to_image_targets(member))
    w = channel_similarity_weights(channel_features, labels).to(device=img.device, dtype=img.dtype)
    w = w @ member  # a distinct prompt's target: the summed weights of its samples
    w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
    loss_cwcl = _soft_ce(_copies(logits_per_image, member), w)
    return loss_cl + loss_cwcl


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, labels=None,
                gather: bool = False) -> torch.Tensor:
    """Sigmoid loss: -(1/N) sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)).

    j runs over the batch's distinct prompts (N of them without labels);
    z_ij = +1 for the image's own prompt, -1 otherwise.  The sum over all
    pairs is divided by N (images) as in the SigLIP paper.
    """
    image_emb, text_emb, labels = _maybe_gather(gather, image_emb, text_emb, labels)
    img, txt, scale = _prep(image_emb, text_emb, logit_scale)
    if not torch.is_tensor(logit_bias):
        logit_bias = torch.tensor(float(logit_bias), device=img.device, dtype=img.dtype)  # not via float32
    member = _groups(labels, img.shape[0], img.device, img.dtype)
    logits = scale * img @ _dedup_text(txt, member).t() + logit_bias.to(device=img.device, dtype=img.dtype)
    z = member * 2 - 1  # (B, U): +1 for the image's own prompt
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


def _hopfield(state: torch.Tensor, stored: torch.Tensor, beta: float) -> torch.Tensor:
    """Rows of ``state`` replaced by the unit-normalised pattern they retrieve from ``stored``."""
    return F.normalize(torch.softmax(beta * state @ stored.t(), dim=1) @ stored, dim=-1)


def _info_loob(k: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """mean over rows of [-mean_{positives} k + logsumexp_{negatives} k] (rows without a negative left out)."""
    pos = positive > 0
    has_neg = ~pos.all(dim=1)
    if not bool(has_neg.any()):
        return k.sum() * 0.0  # nothing to contrast; keeps the graph
    neg = k.masked_fill(pos, float("-inf"))
    neg = torch.where(has_neg[:, None], neg, torch.zeros_like(k))  # finite rows for a NaN-free backward
    row = torch.logsumexp(neg, dim=1) - (k * positive).sum(dim=1) / positive.sum(dim=1)
    return row[has_neg].mean()


def cloob_loss(image_emb, text_emb, logit_scale, *, labels=None, hopfield_scale: float = HOPFIELD_SCALE,
               gather: bool = False) -> torch.Tensor:
    """CLOOB: InfoLOOB on modern-Hopfield-retrieved embeddings (see the module docstring).

    ``logit_scale`` is the log inverse temperature (1/tau), clamped at use like the others;
    ``hopfield_scale`` is the retrieval's beta.
    """
    image_emb, text_emb, labels = _maybe_gather(gather, image_emb, text_emb, labels)
    img, txt, inv_tau = _prep(image_emb, text_emb, logit_scale)
    member = _groups(labels, img.shape[0], img.device, img.dtype)  # (B, U)
    txt = _dedup_text(txt, member)  # the distinct prompts, each stored once
    beta = float(hopfield_scale)
    u_x, u_y = _hopfield(img, img, beta), _hopfield(txt, img, beta)
    v_x, v_y = _hopfield(img, txt, beta), _hopfield(txt, txt, beta)
    loss_img = _info_loob(inv_tau * u_x @ u_y.t(), member)  # image i vs distinct prompts
    loss_txt = _info_loob(inv_tau * v_y @ v_x.t(), member.t())  # distinct prompt u vs images
    return (loss_img + loss_txt) / inv_tau


def compute_loss(name: str, image_emb, text_emb, logit_scale, *, channel_features=None,
                 logit_bias=None, labels=None, gather: bool = False) -> torch.Tensor:
    """Dispatch on ``config.loss`` (one of :data:`LOSSES`); always computed in fp32 (or fp64).

    Autocast is switched off here, so a caller inside a bf16/fp16 autocast region still gets an
    fp32 loss (the similarity matmuls would otherwise run, and the loss come back, in bf16).
    ``labels`` may stay on the CPU (their distinct values are then found without a device sync).
    """
    with torch.autocast(device_type=_device_type(image_emb), enabled=False):
        return _compute_loss(name, image_emb, text_emb, logit_scale, channel_features=channel_features,
                             logit_bias=logit_bias, labels=labels, gather=gather)


def _device_type(t) -> str:
    kind = t.device.type if torch.is_tensor(t) else "cpu"
    return kind if kind in ("cuda", "cpu", "mps", "xpu") else "cpu"


def _compute_loss(name: str, image_emb, text_emb, logit_scale, *, channel_features=None,
                  logit_bias=None, labels=None, gather: bool = False) -> torch.Tensor:
    if name == "cwcl":
        if channel_features is None:
            raise ValueError("cwcl loss needs channel_features (B, C, D)")
        return cwcl_loss(image_emb, text_emb, channel_features, logit_scale, labels=labels, gather=gather)
    if name == "clip":
        return clip_loss(image_emb, text_emb, logit_scale, labels=labels, gather=gather)
    if name == "siglip":
        if logit_bias is None:
            raise ValueError("siglip loss needs logit_bias")
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias, labels=labels, gather=gather)
    if name == "cloob":
        return cloob_loss(image_emb, text_emb, logit_scale, labels=labels, gather=gather)
    raise ValueError(f"unknown loss {name!r} ({' | '.join(LOSSES)})")
