"""CellCLIP checkpoints on disk: one convention for every command and the widget.

A checkpoint is a folder with ``config.json`` + ``model.safetensors`` (all weights, the
text encoder's included, and ``extra.*`` tensors such as the TVN matrices) + ``text/``
(the text encoder's config and tokenizer), so it loads offline.  Nothing is pickled.

:func:`resolve_checkpoint` accepts every folder a user is likely to hand over:

* the checkpoint folder itself (a run's ``model/``, a ``checkpoints/checkpoint-N`` folder,
  the published CellCLIP one);
* the run folder ``python -m training fit`` prints (its ``model/``, or while it is still
  training, its latest ``checkpoints/checkpoint-N``);
* that run's ``checkpoints/`` folder (its latest checkpoint).

:func:`load_model` resolves, loads on a device, and precomputes the checkpoint identity
(:func:`model_identity`).  :func:`prompt_context` says how the prompts the checkpoint was
trained on were written (cell line, templates), so that a plate can be described the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import CellClipError, CheckpointError

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "TEXT_DIR", "TRAINING_STATE", "LATEST",
    "resolve_checkpoint", "latest_checkpoint", "load_model", "model_identity", "save_model", "read_model",
    "check_state_dict", "load_weights", "PromptContext", "prompt_context", "record_prompt_context",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text"
EXTRA_PREFIX = "extra."
#: the optimiser/scheduler/RNG state next to the weights of a training checkpoint
TRAINING_STATE = "training_state.pt"
#: the pointer file naming a run's newest checkpoint (``<run>/checkpoints/latest``)
LATEST = "latest"
# keys a (possibly older) transformers version may have written that are not
# parameters of the model; dropped silently when loading
_BENIGN_KEYS = re.compile(r"^text\.embeddings\.(position_ids|token_type_ids)$")


# ----------------------------------------------------------------- finding checkpoints
def latest_checkpoint(run) -> Path | None:
    """The newest complete ``<run>/checkpoints/checkpoint-N`` (the ``latest`` pointer first), or None."""
    ck = Path(run) / "checkpoints"
    pointer = ck / LATEST
    if pointer.is_file():
        try:
            p = ck / pointer.read_text().strip()
        except OSError:
            p = None
        if p is not None and (p / TRAINING_STATE).is_file():
            return p
    cands = sorted(p for p in ck.glob("checkpoint-*") if (p / TRAINING_STATE).is_file())
    return cands[-1] if cands else None


def resolve_checkpoint(path) -> Path:
    """The checkpoint folder meant by ``path`` (see the module doc); CheckpointError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint folder not found")
    if not p.is_dir():
        raise CheckpointError(f"{p}: a checkpoint is a folder (config.json + model.safetensors), not a file")
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "model" / CONFIG_NAME).is_file():
        return p / "model"
    latest = latest_checkpoint(p) or (latest_checkpoint(p.parent) if p.name == "checkpoints" else None)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"{p}: not a CellCLIP checkpoint ({CONFIG_NAME} missing); give a checkpoint folder, the run folder "
        "`python -m training fit` wrote, its model/ folder or one of its checkpoints/checkpoint-N folders")


def load_model(path, device="auto"):
    """Load the checkpoint ``path`` points at (:func:`resolve_checkpoint`) on ``device``.

    Returns the model in eval mode, with ``model.checkpoint_dir`` set and its identity
    (:func:`model_identity`) computed once.  A missing or damaged checkpoint raises
    :class:`CheckpointError` naming the folder and what is wrong.
    """
    from .devices import resolve_device

    p = resolve_checkpoint(path)
    if not (p / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{p}: not a CellCLIP checkpoint ({WEIGHTS_NAME} missing)")
    dev = resolve_device(device)
    try:
        model = read_model(p, device=dev)
    except CellClipError:
        raise
    except Exception as e:  # json / safetensors / shape errors from a damaged checkpoint
        raise CheckpointError(f"{p}: cannot load checkpoint ({type(e).__name__}: {e})") from e
    model.checkpoint_dir = str(p)
    model._cellclip_id = model_identity(model, use_cached=False)
    return model


# ----------------------------------------------------------------- identity
def _config_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        d = dict(config.to_dict())
    else:
        d = dict(vars(config))
    fc = d.get("feature_correction")
    if isinstance(fc, dict):  # strip in-memory arrays (TVN state)
        d["feature_correction"] = {k: v for k, v in fc.items() if not str(k).startswith("_")}
    return d


def _hash_tensor(h, name: str, t) -> None:
    import torch

    t = t.detach().cpu().contiguous()
    h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_identity(model: Any, *, use_cached: bool = True) -> str:
    """Identity of a checkpoint: a hash of its config and of every weight tensor (32 hex digits).

    Models from :func:`load_model` carry it precomputed (``model._cellclip_id``); otherwise it
    is computed from the state dict (≈0.1 s per 100 MB).  Two models with the same config and
    weights — in memory or reloaded from disk — get the same id.
    """
    if use_cached:
        mid = getattr(model, "_cellclip_id", None)
        if mid:
            return str(mid)
    import torch

    h = hashlib.blake2b(digest_size=16)
    cfg = _config_dict(getattr(model, "config", {}))
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        _hash_tensor(h, name, t)
    for name, t in sorted((getattr(model, "extra_tensors", None) or {}).items()):
        if torch.is_tensor(t):
            _hash_tensor(h, f"extra.{name}", t)
    # TVN matrices of older checkpoints live next to the weights and change the embeddings too
    spec = getattr(getattr(model, "config", None), "feature_correction", None)
    ckpt = getattr(model, "checkpoint_dir", None)
    if isinstance(spec, dict) and spec.get("state_file") and ckpt:
        f = Path(ckpt) / spec["state_file"]
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------- writing / reading
def save_model(model, path) -> Path:
    """Write config.json + model.safetensors + text/ into folder ``path`` atomically."""
    import torch
    from safetensors.torch import save_file

    from ._fsutil import atomic_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder")
    with atomic_dir(path) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        for name, t in model.extra_tensors.items():
            if not torch.is_tensor(t):
                raise CheckpointError(f"extra_tensors[{name!r}] is not a tensor")
            tensors[EXTRA_PREFIX + name] = t.detach().to("cpu").contiguous().clone()
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(model.config.to_json() + "\n", encoding="utf-8")
        text_dir = tmp / TEXT_DIR
        text_dir.mkdir()
        model.text.config.save_pretrained(str(text_dir))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(text_dir))
        for p in list(text_dir.iterdir()):  # tokenizers may write this; keep weights single-sourced
            if p.name in ("pytorch_model.bin", "model.safetensors"):
                p.unlink()
    return path


def _read_state(path: Path) -> tuple[dict, dict, bool]:
    """(model tensors, extra tensors, whether the published SigLIP "bias" was renamed) of
    ``path/model.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: cannot read weights ({exc})") from None
    _check_finite(weights, state)
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in state.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX) and not _BENIGN_KEYS.match(k)}
    renamed = "bias" in state and "logit_bias" not in state  # reference name of the SigLIP bias
    if renamed:
        state["logit_bias"] = state.pop("bias")
    return state, extra, renamed


def _check_finite(weights: Path, state: Mapping) -> None:
    """CheckpointError naming the tensors holding NaN or ±inf (a diverged or damaged checkpoint
    would otherwise embed everything to NaN)."""
    import torch

    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{weights}: NaN or infinite values in {', '.join(bad[:5])}{more} "
                              "(a diverged training run or a damaged file); use an earlier checkpoint")


def _check_sizes(path: Path, config, state: Mapping) -> None:
    """Before anything is built: the sizes config.json gives must be those of the weights on disk
    (a config with absurd sizes would otherwise allocate them first)."""
    want = {"visual.channel_embed": (config.input_channels, config.vision_width),
            "visual.proj": (config.vision_width, config.embed_dim)}
    for key, shape in want.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise CheckpointError(f"{path / CONFIG_NAME} does not describe {path / WEIGHTS_NAME}: {key} should be "
                                  f"{shape} by the config but is {got if got else 'missing'} in the weights")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    want_layers = set(range(config.vision_layers))
    if layers != want_layers:
        odd = min(want_layers - layers) if want_layers - layers else max(layers - want_layers)
        what = "missing" if odd in want_layers else "unexpected"
        key = f"visual.transformer.resblocks.{odd}.attn.in_proj_weight"
        raise CheckpointError(f"{path / CONFIG_NAME}: vision_layers is {config.vision_layers} but "
                              f"{path / WEIGHTS_NAME} holds {len(layers)} vision layers ({key} {what})")


def _check_text_size(path: Path, tcfg, state: Mapping) -> None:
    """The text encoder config must not describe a model far larger than the ``text.*`` weights."""
    hidden, layers = getattr(tcfg, "hidden_size", None), getattr(tcfg, "num_hidden_layers", None)
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers)):
        return
    inner = getattr(tcfg, "intermediate_size", None) or 4 * hidden
    vocab = getattr(tcfg, "vocab_size", 0) or 0
    wanted = layers * (4 * hidden * hidden + 2 * hidden * inner) + vocab * hidden
    held = sum(t.numel() for k, t in state.items() if k.startswith("text."))
    if wanted > 2 * held + 10**6:
        raise CheckpointError(f"{path}: the text encoder config (hidden_size {hidden}, {layers} layers, vocabulary "
                              f"{vocab}) describes ~{wanted:.3g} weights but {WEIGHTS_NAME} holds {held:.3g}")


def _text_config(path: Path, state: Mapping, text_config):
    from transformers import AutoConfig, PretrainedConfig

    text_dir = path / TEXT_DIR
    try:
        if text_config is not None:
            if isinstance(text_config, PretrainedConfig):
                return text_config
            return AutoConfig.from_pretrained(str(text_config))
        if (text_dir / "config.json").is_file():
            return AutoConfig.from_pretrained(str(text_dir))
        return _infer_bert_config(state)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"{path}: cannot read the text encoder config ({exc})") from None


def read_model(path, device=None, *, tokenizer=None, text_config=None):
    """Load our checkpoint folder or the published CellCLIP one (strict); see ``CellCLIP.from_pretrained``."""
    from transformers import AutoModel

    from .model import CellCLIP, CellCLIPConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config = CellCLIPConfig.from_json_file(path / CONFIG_NAME)
    state, extra, renamed_bias = _read_state(path)
    _check_sizes(path, config, state)
    if renamed_bias:
        config.extras["use_bias"] = True
    tcfg = _text_config(path, state, text_config)
    _check_text_size(path, tcfg, state)
    text_model = AutoModel.from_config(tcfg)
    if tokenizer is None and (path / TEXT_DIR / "tokenizer_config.json").is_file():
        tokenizer = str(path / TEXT_DIR)
    model = CellCLIP(config, text_model=text_model, tokenizer=None)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    check_state_dict(model.state_dict(), state, str(path / WEIGHTS_NAME))
    model.load_state_dict(dict(state), strict=True)
    model.extra_tensors = dict(extra)
    if device is not None:
        model.to(device)
    return model.eval()


def load_weights(model, path) -> None:
    """Load a checkpoint's weights and extra tensors into an existing model (training resume)."""
    state, extra, _ = _read_state(Path(path))
    check_state_dict(model.state_dict(), state, str(path))
    model.load_state_dict(dict(state), strict=True)
    model.extra_tensors = extra


def check_state_dict(expected: Mapping, given: Mapping, where: str = "checkpoint") -> None:
    """Raise CheckpointError listing missing, unexpected and wrong-shape keys."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    wrong = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} != model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or wrong):
        return

    def listing(title, items):
        more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
        return f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:40]) + more

    parts = [f"{where} does not match the CellCLIP model"]
    parts += [listing(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("wrong shapes", wrong)) if i]
    raise CheckpointError("\n".join(parts))


def _infer_bert_config(state: Mapping):
    """A BertConfig shaped like the ``text.*`` tensors of a published checkpoint.

    Sizes come from the tensors; the head count (not visible in shapes)
    follows the BERT family convention: 12 heads when hidden % 12 == 0
    (bert-base-cased: 768/12, MiniLM: 384/12), else hidden // 64, else 1.
    """
    from transformers import BertConfig

    key = "text.embeddings.word_embeddings.weight"
    if key not in state:
        raise CheckpointError(
            "checkpoint has no text encoder: no text/ folder and no 'text.*' weights "
            f"(missing {key})"
        )
    vocab, hidden = state[key].shape
    layers = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"text\.encoder\.layer\.(\d+)\.", k))),
        default=-1,
    )

    def dim(name: str, axis: int, default: int) -> int:
        t = state.get(f"text.{name}")
        return int(t.shape[axis]) if t is not None else default

    heads = 12 if hidden % 12 == 0 else (hidden // 64 if hidden % 64 == 0 else 1)
    return BertConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=int(layers),
        num_attention_heads=int(heads), intermediate_size=dim("encoder.layer.0.intermediate.dense.weight", 0,
                                                              4 * int(hidden)),
        max_position_embeddings=dim("embeddings.position_embeddings.weight", 0, 512),
        type_vocab_size=dim("embeddings.token_type_embeddings.weight", 0, 2),
    )


# ----------------------------------------------------------------- prompt context
@dataclasses.dataclass(frozen=True)
class PromptContext:
    """How the prompts a checkpoint was trained on were written.

    ``cell_line``: the cell line they name (``None``: they name none, "Cells treated with …");
    ``templates``: the :class:`~napari_cellclip.prompts.PromptTemplates` they were built with.
    """

    cell_line: str | None
    templates: Any

    def to_json(self) -> dict:
        return {"cell_line": self.cell_line, "templates": self.templates.to_dict()}

    def example(self) -> str:
        """A compound prompt in this form, e.g. ``"A549 cells treated with compound: <name>"``."""
        from .prompts import compound_prompt

        return compound_prompt("<name>", cell=self.cell_line, templates=self.templates)


def _templates(d) -> Any:
    from .prompts import DEFAULT_TEMPLATES, PromptTemplates

    if not isinstance(d, Mapping):
        return DEFAULT_TEMPLATES
    known = {f.name for f in dataclasses.fields(PromptTemplates)}
    return PromptTemplates(**{k: v for k, v in d.items() if k in known})


def _cell_line_of(prompts) -> tuple[bool, str | None]:
    """(known, cell line) from the texts of trained prompts: every template starts "{cell} cells "."""
    cells = set()
    for p in prompts or []:
        head, sep, _ = str(p).partition(" cells ")
        if str(p).startswith("Cells "):
            cells.add(None)
        elif sep:
            cells.add(head)
    if len(cells) == 1:
        return True, cells.pop()
    return False, None


def prompt_context(config) -> PromptContext | None:
    """The :class:`PromptContext` of a checkpoint config, or None when it cannot be told.

    Recorded by ``fit`` (``config.prompt_context``); for older checkpoints it is read off the
    prompts they were trained on (``config.training["prompts"]``).
    """
    ctx = getattr(config, "prompt_context", None)
    if isinstance(ctx, Mapping):
        if ctx.get("cell_lines"):  # trained on several cell lines: no one form to fill in
            return None
        cell = ctx.get("cell_line")
        return PromptContext(str(cell) if cell else None, _templates(ctx.get("templates")))
    known, cell = _cell_line_of((getattr(config, "training", None) or {}).get("prompts"))
    return PromptContext(cell, _templates(None)) if known else None


def record_prompt_context(fields, templates=None) -> dict:
    """The prompt context of a training fields table (its one cell line, or none) as JSON."""
    from .prompts import DEFAULT_TEMPLATES

    cells: list[str] = []
    if "Metadata_cell_line" in getattr(fields, "columns", ()):
        cells = sorted({str(c).strip() for c in fields["Metadata_cell_line"].dropna() if str(c).strip()})
    out = PromptContext(cells[0] if len(cells) == 1 else None, templates or DEFAULT_TEMPLATES).to_json()
    if len(cells) > 1:
        out["cell_lines"] = cells
    return out
