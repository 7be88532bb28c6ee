"""Getting a catalog file's bytes: from a mirror (folder or URL base) first, then its public URL.

Every copy is hashed while it is written to a temporary file beside the target and only
renamed into place once its sha256 (or, lacking one, its size) matches.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from visionserve import __version__
from visionserve.store.catalog import CatalogFile

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)
_CHUNK = 1 << 20


class FetchError(Exception):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sources(file: CatalogFile, folder: str, mirror: str | None) -> list[str]:
    """Where to look for a file, in order: the mirror, then the public URL."""
    found = []
    if mirror:
        found.append(mirror.rstrip("/") + f"/{folder}/{file.name}")
    found.append(file.url)
    return found


def fetch(file: CatalogFile, folder: str, target: Path, mirror: str | None, progress: Progress | None = None) -> str:
    """Puts a verified copy of ``file`` at ``target``; returns where it came from."""
    errors = []
    for src in sources(file, folder, mirror):
        try:
            _copy_verified(src, file, target, progress)
            return src
        except FetchError as e:
            errors.append(f"{src}: {e}")
    raise FetchError(f"could not get {file.name}:\n  " + "\n  ".join(errors))


def _copy_verified(src: str, file: CatalogFile, target: Path, progress: Progress | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; models may be served by another user
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _read(src, progress):
                size += len(chunk)
                if file.size is not None and size > file.size:  # not this file: stop before the disk fills
                    raise FetchError(f"more than the {file.size} bytes the catalog gives")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if file.sha256 and got != file.sha256:
            raise FetchError(f"sha256 mismatch: got {got}, catalog says {file.sha256}")
        if not file.sha256 and file.size is not None and size != file.size:
            raise FetchError(f"size mismatch: got {size} bytes, catalog says {file.size}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _read(src: str, progress: Progress | None):
    parsed = urlparse(src)
    if parsed.scheme in ("http", "https"):
        # Imported here: a server whose models are installed never downloads, and httpx
        # (with ssl) adds about 5 MB to every process that imports the store.
        import httpx

        try:
            with httpx.stream(
                "GET", src, follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0),
                headers={"User-Agent": f"visionserve/{__version__}"},
            ) as r:
                if r.status_code != 200:
                    raise FetchError(f"HTTP {r.status_code}")
                total = int(r.headers["content-length"]) if "content-length" in r.headers else None
                done = 0
                for chunk in r.iter_bytes(_CHUNK):
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                    yield chunk
        except httpx.HTTPError as e:
            raise FetchError(f"{type(e).__name__}: {e}") from None
        return
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else src)  # "~" expanded by the settings
    if not path.is_file():
        raise FetchError("no such file")
    try:
        total = path.stat().st_size
        done = 0
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                done += len(chunk)
                if progress:
                    progress(done, total)
                yield chunk
    except OSError as e:  # unreadable (permissions, a disk error): the next source is tried
        raise FetchError(f"cannot read it: {e.strerror or type(e).__name__}") from None

