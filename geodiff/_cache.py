"""On-disk cache location and atomic writes (shared by geometry and data).

The cache folder is ``$GEODIFF_CACHE`` if set, else ``~/.cache/geodiff``. The Makefile points it at
the git-ignored ``.cache/`` folder of the checkout.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir(*parts: str) -> Path:
    """Return (and create) a sub-folder of the geodiff cache.

    Args:
        *parts: sub-folder names, e.g. ``cache_dir("geometry")``.

    Returns:
        The folder as an absolute path; it exists on return.
    """
    root = os.environ.get("GEODIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geodiff")
    path = Path(root).expanduser().resolve().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_hash(*arrays, salt: str = "") -> str:
    """SHA-256 (hex, 24 characters) of arrays' dtypes, shapes and bytes, plus a salt string."""
    h = hashlib.sha256(salt.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def read_npz(path: str | os.PathLike, meta_key: str, what: str) -> tuple[dict, dict]:
    """Read a whole ``.npz`` file written by geodiff: every array, eagerly, and its JSON metadata.

    A truncated, corrupted (bad CRC) or foreign file, or one whose metadata is not JSON, raises a
    ValueError naming ``path`` and ``what`` it should have been; nothing is returned half-read.

    Args:
        path: the file (it must exist; callers check, to raise their own FileNotFoundError).
        meta_key: the name of the array that holds the JSON metadata.
        what: the kind of file, for the message (e.g. "saved DiffusionPrior").

    Returns:
        (metadata dict, {name: array} of every array in the file).
    """
    import json
    import zipfile
    import zlib

    bad = f"path: {str(path)!r} is not a readable {what}"
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError(f"{bad} (a single .npy array, not an .npz archive)")
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as e:
        raise ValueError(f"{bad} (truncated or corrupted: {type(e).__name__}: {e})") from None
    except ValueError as e:
        if str(e).startswith(bad):
            raise
        raise ValueError(f"{bad} ({e})") from None
    if meta_key not in arrays:
        raise ValueError(f"{bad} (no {meta_key!r} entry: not written by geodiff)")
    try:
        meta = json.loads(str(arrays[meta_key]))
    except ValueError as e:
        raise ValueError(f"{bad} (its metadata is not JSON: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{bad} (its metadata is not a JSON object)")
    return meta, arrays


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """Write an ``.npz`` file atomically: a temporary file in the same folder, then ``os.replace``.

    A reader never sees a half-written file, even if the writer is killed.
    """
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(tmp)`` fills a temporary file (its path, a ``str``) in
    the same folder, which then replaces ``path`` (``os.replace``). On any error nothing is left
    behind and a previous file at ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
