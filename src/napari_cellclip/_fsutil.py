"""Small file-system helpers shared by checkpoints, stores and training state."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(final) -> Iterator[Path]:
    """Write a folder next to ``final`` and swap it in when the block succeeds.

    Yields an empty temporary folder beside ``final``.  On success it replaces
    ``final`` (an existing folder there is moved aside, then removed); on any
    error, a KeyboardInterrupt included, the temporary folder is deleted and
    ``final`` is left as it was.  A killed process therefore never leaves a
    half-written folder under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
