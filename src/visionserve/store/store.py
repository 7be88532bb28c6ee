"""The local model store: one folder per model holding its files and a ``manifest.json``.

``pull`` fills a folder from the catalog (through the mirror when one is set), ``verify``
re-hashes what is there, and ``manifest`` is what the server loads.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from visionserve.config import MODEL_NAME
from visionserve.errors import ModelError, ModelNotFound
from visionserve.store.catalog import CATALOG, CatalogEntry, get_entry
from visionserve.store.fetch import FetchError, Progress, fetch, sha256_file
from visionserve.store.manifest import MANIFEST_NAME, ModelManifest, write_atomic

# A derived version of a model (e.g. a quantized graph) lives in its own folder ``<name>@<version>``
# beside the model it came from, and is addressed by that same string.
VERSION_SEP = "@"


_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_store_name(name: str) -> bool:
    """Whether ``name`` names a folder of the store: a model's name, or a version's
    ``<name>@<version>``; never a path."""
    base, sep, version = name.partition(VERSION_SEP)
    return bool(MODEL_NAME.fullmatch(base)) and (not sep or bool(_VERSION_NAME.fullmatch(version)))


def version_ref(name: str, version: str) -> str:
    return f"{name}{VERSION_SEP}{version}"


def check_version_name(version: str) -> str:
    """A version name becomes part of a folder name: letters, digits, '.', '_' and '-' only."""
    if not _VERSION_NAME.fullmatch(version):
        raise ModelError(
            f"invalid version name {version!r}: up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return version


def check_derived_version(base: ModelManifest, version: str) -> str:
    """A valid name for a new version of ``base``, and not ``base``'s own: two graphs would
    answer under one name and version."""
    if check_version_name(version) == base.version:
        raise ModelError(f"version {version!r} is {base.name}'s own: give the new one another name")
    return version


# Turns an entry's downloaded files into a manifest (and any derived files). One per format.
Installer = Callable[[CatalogEntry, Path], ModelManifest]
INSTALLERS: dict[str, Installer] = {}


def install_onnx(entry: CatalogEntry, folder: Path) -> ModelManifest:
    model = next(f for f in entry.files if f.name == entry.model_file)
    return ModelManifest(
        name=entry.name,
        version=entry.version,
        family=entry.family,
        file=entry.model_file,
        labels=list(entry.labels),
        input_width=entry.input_width,
        input_height=entry.input_height,
        options=dict(entry.options),
        min_confidence=entry.min_confidence,
        iou=entry.iou,
        max_detections=entry.max_detections,
        sha256=model.sha256,
        source="catalog",
        description=entry.description,
    )


INSTALLERS["onnx"] = install_onnx


def install_darknet(entry: CatalogEntry, folder: Path) -> ModelManifest:
    """Imports a darknet cfg + weights to ONNX (imported lazily: the importer pulls in onnx)."""
    from visionserve.darknet.importer import install_darknet as _install

    return _install(entry, folder)


INSTALLERS["darknet"] = install_darknet


@dataclass(frozen=True, slots=True)
class FileCheck:
    name: str
    ok: bool
    detail: str


def _manifest_problem(e: Exception) -> str:
    """What is wrong with a manifest, in words that name no file."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    if isinstance(e, ValidationError):
        problems = [f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors()]
        return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(e, TypeError):
        return "not a JSON object"
    if isinstance(e, OSError):
        return f"it cannot be read ({e.strerror or type(e).__name__})"
    return type(e).__name__


class ModelStore:
    def __init__(self, root: Path, mirror: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.mirror = mirror

    def folder(self, name: str) -> Path:
        return self.root / name

    def manifest(self, name: str) -> ModelManifest | None:
        """The installed model's manifest, or None when it is not (completely) installed."""
        manifest = self.written_manifest(name)
        return manifest if manifest is not None and manifest.path.is_file() else None

    def written_manifest(self, name: str) -> ModelManifest | None:
        """The manifest in the model's folder, or None where there is none; whether its model
        file is there too is not checked (``verify`` says it is missing)."""
        folder = self.folder(name)
        if not (folder / MANIFEST_NAME).is_file():
            return None
        try:
            manifest = ModelManifest.load(folder)
        except (ValueError, TypeError, OSError) as e:
            # The message can reach HTTP clients (the load API, model status): no path in it.
            raise ModelError(
                f"the {MANIFEST_NAME} of {name!r} is broken: {_manifest_problem(e)}",
                # One line (a ValidationError's text runs to many): the message has the problem.
                detail=f"{folder / MANIFEST_NAME}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}",
            ) from None
        return manifest

    def check_writable(self, names: list[str]) -> None:
        """ModelError unless the store takes new files and each of ``names`` can have its
        folder (none, or a folder already: not a file in the way)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as e:
            raise ModelError(f"cannot write to the model store: {e.strerror or e}", detail=f"{self.root}: {e}") from None
        for name in names:
            folder = self.folder(name)
            if folder.exists() and not folder.is_dir():
                raise ModelError(f"cannot install {name!r}: something other than a folder is in its place",
                                 detail=str(folder))

    def written(self) -> list[str]:
        """The names of the store's folders that hold a manifest, installed whole or not."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file())

    def installed(self, broken: Callable[[str, ModelError], None] | None = None) -> list[ModelManifest]:
        """The installed models' manifests. A broken manifest raises its ModelError, or with
        ``broken`` is handed to it (with the folder's name) and left out."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                found.append(self.manifest(folder.name))
            except ModelError as e:
                if broken is None:
                    raise
                broken(folder.name, e)
        return [m for m in found if m is not None]

    def pull(self, name: str, *, force: bool = False, progress: Callable[[str], Progress] | None = None) -> ModelManifest:
        """Downloads (or copies from the mirror) and verifies a catalog model, then installs it;
        an installed one is re-hashed and repaired if it has changed."""
        entry = get_entry(name)
        # Installed and intact: nothing to do. Installed but altered (a file truncated or
        # changed since): the files that fail their sha256 are fetched again below.
        if not force:
            try:
                existing = self.manifest(name)
            except ModelError:  # a broken manifest: installed again below (intact files are kept)
                existing = None
            if existing is not None and all(c.ok for c in self.verify(name)):
                return existing
        folder = self.folder(name)
        existed = folder.exists()
        _remove_stale_parts(folder)
        for f in entry.files:
            target = folder / f.name
            if not force and intact(target, f.sha256, f.size):
                continue
            try:
                fetch(f, entry.folder, target, self.mirror, progress(f.name) if progress else None)
            except FetchError as e:  # names the mirror's paths: for the log, not for clients
                if not existed and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()  # made for this pull, and nothing came: leave no trace
                raise ModelError(f"could not get {f.name} for {name!r}", detail=str(e)) from None
        installer = INSTALLERS.get(entry.format)
        if installer is None:
            raise ModelError(f"no installer for model format {entry.format!r}")
        manifest = installer(entry, folder)
        manifest.save(folder)
        return ModelManifest.load(folder)

    def ensure(self, name: str) -> ModelManifest:
        """The installed manifest, pulling the model first when it is a missing catalog model."""
        manifest = self.manifest(name)
        if manifest is not None:
            return manifest
        if name in CATALOG:
            return self.pull(name)
        # The store's folder is the server's business: this message can reach HTTP clients.
        raise ModelNotFound(f"model {name!r} is neither installed in the model store nor in the catalog")

    @staticmethod
    def check_unchanged(manifest: ModelManifest) -> None:
        """ModelError when an installed model's file no longer has the sha256 it was installed
        with (damaged or altered since): a model is loaded only as it was verified. Hashing a
        few MB takes milliseconds, once per load."""
        if manifest.sha256 and manifest.path.is_file() and sha256_file(manifest.path) != manifest.sha256:
            raise ModelError(
                f"model {manifest.name!r}: its file has changed since it was installed (its sha256 differs); "
                f"install it again (a catalog model: `visionserve models pull {manifest.name}`)"
            )

    def add_version(
        self,
        base: ModelManifest,
        version: str,
        model_file: Path,
        *,
        description: str = "",
        backend: str = "onnxruntime",
        backend_options: dict[str, str] | None = None,
    ) -> ModelManifest:
        """Installs a derived ONNX graph of ``base`` as ``<name>@<version>`` (its own folder and
        manifest), to run on ``backend`` with ``backend_options``."""
        folder = self.folder(version_ref(base.name, check_derived_version(base, version)))
        try:
            previous = self.manifest(version_ref(base.name, version))
        except ModelError:
            previous = None  # a broken install of this version: replaced whole below
        data = Path(model_file).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        # Named by the version, not by the file handed in (optimize's scratch names say which
        # recipe built a graph first, and a graph can serve several), and by its content: a
        # new build never overwrites the file the installed manifest names, so until the new
        # manifest is in place the version installed before stays whole.
        target = folder / f"{Path(base.file).stem}.{version}.{digest[:12]}{Path(model_file).suffix}"
        write_atomic(target, data)
        manifest = base.model_copy(
            update={
                "version": version,
                "file": target.name,
                "sha256": digest,
                "source": f"derived:{version_ref(base.name, base.version)}",
                "description": description or base.description,
                "backend": backend,
                "backend_options": dict(backend_options or {}),
            }
        )
        try:
            manifest.save(folder)
        except BaseException:
            if previous is None or previous.path != target:
                target.unlink(missing_ok=True)  # not installed after all
            raise
        if previous is not None and previous.path.parent == folder and previous.path != target:
            previous.path.unlink(missing_ok=True)  # the file of the version this one replaces
        return ModelManifest.load(folder)

    def verify(self, name: str) -> list[FileCheck]:
        """Re-hashes an installed model's files against the catalog (or its manifest); a file
        with no published sha256 is checked for its size where the catalog gives one."""
        folder = self.folder(name)
        entry = CATALOG.get(name)
        manifest = self.written_manifest(name)
        if manifest is None:
            return [FileCheck(name, False, f"not installed in {folder}")]
        # path -> (name shown, sha256, size)
        expected = {folder / f.name: (f.name, f.sha256, f.size) for f in entry.files} if entry else {}
        shown = manifest.path.name if manifest.path.parent == folder else str(manifest.path)  # absolute in the manifest
        expected.setdefault(manifest.path, (shown, manifest.sha256, None))
        return [
            FileCheck(fname, *_check_file(path, sha, size))
            for path, (fname, sha, size) in sorted(expected.items(), key=lambda item: item[1][0])
        ]


def _check_file(path: Path, sha256: str | None, size: int | None) -> tuple[bool, str]:
    """Whether ``path`` is the file described, and in what words: by its sha256, else by its
    size; a file with neither (the catalog has none: see its tests) by being there."""
    if not path.is_file():
        return False, "missing"
    if sha256 is not None:
        got = sha256_file(path)
        return got == sha256, "sha256 ok" if got == sha256 else f"sha256 {got} != {sha256}"
    if size is not None:
        got_size = path.stat().st_size
        return got_size == size, "size ok (no published sha256)" if got_size == size else f"size {got_size} != {size} bytes"
    return True, "present (no published sha256 or size)"


def intact(path: Path, sha256: str | None, size: int | None) -> bool:
    """Whether ``path`` is the catalog file described (a pull keeps it then)."""
    return _check_file(path, sha256, size)[0]


STALE_PART_S = 600.0  # a download's temporary file unwritten this long was left by a killed pull


def _remove_stale_parts(folder: Path) -> None:
    """Deletes the temporary files of pulls that were killed (a pull under way writes to its
    own file every moment, so it is left alone)."""
    if not folder.is_dir():
        return
    now = time.time()
    for part in folder.glob(".*.part"):
        try:
            if now - part.stat().st_mtime > STALE_PART_S:
                part.unlink()
        except OSError:
            pass  # gone already, or not ours to delete
