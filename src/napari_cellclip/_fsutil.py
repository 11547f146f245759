"""The one place files and folders are written and files are digested.

Every file napari-cellclip writes (feature-cache entries, stores, job shards, checkpoints,
reports, exports) is written to a temporary sibling and moved into place by
:func:`publish`, so a killed process never leaves a half-written file or folder under its
final name.  Writers that need a path (pandas, faiss, safetensors, ``np.save``) use
:func:`atomic_file`; small payloads use :func:`atomic_write_bytes` / :func:`atomic_write_text`
/ :func:`atomic_save_npy`; folders use :func:`atomic_dir`; a writer that fills a file over
time (a memory-mapped array) takes a :func:`temp_path` and calls :func:`publish` or
:func:`discard`.  :func:`publish` is the single point where a finished temporary becomes
visible, so an fsync added there covers every write.  Arrays written by :func:`atomic_save_npy`
(feature-cache entries, job shards) end with a content checksum (a trailer after the array data,
which ``np.load`` ignores) that :func:`load_npy` checks on read: a flipped bit or a cut-short file
is a :class:`~napari_cellclip.errors.CorruptFileError`, never data.  Logs that grow a
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
           "discard", "file_digest", "load_npy", "publish", "remove_stale_temps", "temp_path", "verify_npy"]

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


def remove_stale_temps(folder, name: str | None = None) -> list[Path]:
    """Remove the temporaries a killed writer left in ``folder`` (not recursive) → what was removed;
    with ``name``, only those of that final name.  Call it only where no other process is writing
    into ``folder`` (or, with ``name``, writing that name)."""
    folder = Path(folder)
    prefix = "." if name is None else f".{name}."
    stale = [p for p in folder.iterdir() if p.name.startswith(prefix) and _TEMP_NAME.match(p.name)
             ] if folder.is_dir() else []
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


#: the trailer of a checksummed .npy: magic + blake2b-16 of every byte before it
_SUM_MAGIC = b"\x93CCSUM1\x00"
_SUM_SIZE = len(_SUM_MAGIC) + 16


class _HashingWriter:
    """A file wrapper that digests what is written (``np.save`` writes to it chunk by chunk)."""

    def __init__(self, fh):
        self.fh, self.h = fh, hashlib.blake2b(digest_size=16)

    def write(self, data) -> int:
        self.h.update(data)
        return self.fh.write(data)


def atomic_save_npy(path, array) -> Path:
    """``np.save`` (never pickling) to ``path`` atomically, with a checksum trailer; returns the path."""
    import numpy as np

    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            out = _HashingWriter(fh)
            np.save(out, np.asarray(array), allow_pickle=False)
            fh.write(_SUM_MAGIC + out.h.digest())
    return path


_VERIFIED: set[tuple[str, int, int]] = set()


def verify_npy(path) -> None:
    """CorruptFileError unless ``path`` ends with the checksum of its contents (see the module doc);
    a file verified once is not read again while its size and mtime stay."""
    from .errors import CorruptFileError

    path = Path(path)
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo in _VERIFIED:
        return
    with open(path, "rb") as fh:
        fh.seek(max(0, st.st_size - _SUM_SIZE))
        tail = fh.read(_SUM_SIZE)
        if len(tail) < _SUM_SIZE or not tail.startswith(_SUM_MAGIC):
            raise CorruptFileError(path, "no content checksum (cut short, or written by an older version)",
                                   unverified=True)
        stored = tail[len(_SUM_MAGIC):]
        fh.seek(0)
        h, left = hashlib.blake2b(digest_size=16), st.st_size - _SUM_SIZE
        while left > 0:
            chunk = fh.read(min(left, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    if h.digest() != stored:
        raise CorruptFileError(path, "contents do not match their checksum (damaged on disk)")
    _VERIFIED.add(memo)


def load_npy(path, *, mmap: bool = False):
    """``np.load`` of a file :func:`atomic_save_npy` wrote, after :func:`verify_npy`; never unpickles.
    CorruptFileError when it fails its checksum; OSError when it cannot be read."""
    import numpy as np

    from .errors import CorruptFileError

    verify_npy(path)
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError) as exc:
        raise CorruptFileError(path, f"not a readable array ({exc})") from None


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
