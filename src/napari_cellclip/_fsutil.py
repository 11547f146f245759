"""The one place files and folders are written and files are digested.

Every file napari-cellclip writes (feature-cache entries, stores, job shards, checkpoints,
reports, exports) is written to a temporary sibling and moved into place by
:func:`publish`, so a killed process never leaves a half-written file or folder under its
final name.  Writers that need a path (pandas, faiss, safetensors, ``np.save``) use
:func:`atomic_file`; small payloads use :func:`atomic_write_bytes` / :func:`atomic_write_text`
/ :func:`atomic_save_npy`; folders use :func:`atomic_dir`; a writer that fills a file over
time (a memory-mapped array) takes a :func:`temp_path` and calls :func:`publish` or
:func:`discard`.  :func:`publish` is the single point where a finished temporary becomes
visible, so a content checksum (or an fsync) added there covers every write.  Logs that grow a
line at a time (``metrics.jsonl``) go through :func:`append_text`; scratch files a process
maps and removes itself take a :func:`temp_path`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["append_text", "atomic_dir", "atomic_file", "atomic_save_npy", "atomic_write_bytes", "atomic_write_text",
           "discard", "file_digest", "publish", "remove_stale_temps", "temp_path"]

#: the names :func:`temp_path` gives (``.<final name>.<kind>-<8 hex digits>``)
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


def temp_path(final, kind: str = "tmp") -> Path:
    """A fresh hidden path beside ``final`` to write to before :func:`publish` (parent created)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:8]}"


def publish(tmp: Path, final) -> None:
    """Make a finished temporary file or folder visible under ``final`` (replacing what was there)."""
    final = Path(final)
    if tmp.is_dir() and final.exists():
        old = temp_path(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def remove_stale_temps(folder) -> list[Path]:
    """Remove the temporaries a killed writer left in ``folder`` (not recursive) → what was removed.
    Call it only where no other process is writing into ``folder``."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TEMP_NAME.match(p.name)] if folder.is_dir() else []
    for p in stale:
        discard(p)
    return stale


def discard(tmp: Path) -> None:
    """Remove an unfinished temporary file or folder."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        try:
            tmp.unlink()
        except OSError:
            pass


@contextmanager
def atomic_dir(final) -> Iterator[Path]:
    """Write a folder next to ``final`` and swap it in when the block succeeds.

    Yields an empty temporary folder beside ``final``.  On success it replaces
    ``final`` (an existing folder there is moved aside, then removed); on any
    error, a KeyboardInterrupt included, the temporary folder is deleted and
    ``final`` is left as it was.  A killed process therefore never leaves a
    half-written folder under the final name.
    """
    with atomic_file(final, folder=True) as tmp:
        yield tmp


@contextmanager
def atomic_file(final, *, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``final`` to write to; moved onto ``final`` when the block succeeds.

    The parent folder is created (and with ``folder=True`` the temporary path itself, empty).
    On any error the temporary file is removed and ``final`` is left as it was.
    """
    tmp = temp_path(final)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        discard(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def append_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Append ``text`` to a log file (``metrics.jsonl``): appends are not swapped in, a line at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding=encoding) as fh:
        fh.write(text)
    return path


def atomic_save_npy(path, array) -> Path:
    """``np.save`` (never pickling) to ``path`` atomically; returns the path."""
    import numpy as np

    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)
    return path


_DIGEST_MEMO: dict[tuple[str, int, int], str] = {}


def file_digest(path) -> str:
    """blake2b (20 bytes, hex) of a file's contents, memoised per (path, size, mtime) in this process.

    Raises OSError when the file cannot be read.
    """
    path = Path(path)
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _DIGEST_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        digest = _DIGEST_MEMO[memo_key] = h.hexdigest()
    return digest
