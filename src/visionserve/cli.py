"""The ``visionserve`` command: serve, detect, models."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from visionserve import __version__
from visionserve.config import ConfigError, Settings, load_settings, model_entry
from visionserve.errors import InvalidParameter, ModelError, VisionServeError

app = typer.Typer(help="visionserve: an inference server for image object detection.", no_args_is_help=True)
models_app = typer.Typer(help="The model catalog and the local model store.", no_args_is_help=True)
app.add_typer(models_app, name="models")
# soft_wrap: a message piped to a log collector stays one line (a URL is not cut at 80 columns).
err = Console(stderr=True, soft_wrap=True)
# `serve --log-format json`: its own messages (pulls, errors) go out as JSON log lines too.
_json_logs = False

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", envvar="VISIONSERVE_CONFIG", help="TOML config file")
]
ModelDirOpt = Annotated[Optional[Path], typer.Option("--model-dir", help=r"local model store \[env VISIONSERVE_MODEL_DIR]")]
MirrorOpt = Annotated[Optional[str], typer.Option("--mirror", help=r"model mirror folder or URL base \[env VISIONSERVE_MODEL_MIRROR]")]


def _error(message: object) -> None:
    """An error line on stderr. The message is escaped: Rich would take text in brackets,
    such as ``pip install 'visionserve[openvino]'``, for markup and drop it."""
    if _json_logs:
        logging.getLogger("visionserve").error("%s", message)
        return
    err.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


def _note(message: str) -> None:
    """A line of progress on stderr (a log line when the server logs JSON)."""
    if _json_logs:
        logging.getLogger("visionserve").info("%s", message)
        return
    err.print(escape(message), highlight=False)


def _described(e: VisionServeError) -> str:
    """The error's message and, for the operator at the terminal, its detail (file paths,
    a library's own words), which servers keep out of their answers."""
    return f"{e.message}\n  {e.detail}" if e.detail else e.message


def _settings(config: Path | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as e:
        _error(e)
        raise typer.Exit(2) from None


def _settings_for_model(config: Path | None, model: str | None, **overrides: object) -> Settings:
    """Settings in which ``model`` (NAME or NAME@VERSION) is the default. A model the config
    lists keeps its settings there (the version given replacing its own); any other is a
    catalog or store model on its own defaults."""
    settings = _settings(config, **overrides)
    if model is None:
        return settings
    given = model_entry(model)
    listed = next((m for m in settings.models if m.name == given["name"]), None)
    if listed is not None and "version" not in given:
        return settings
    entry = {**(listed.model_dump(exclude_unset=True) if listed is not None else {}), **given}
    return _settings(config, **overrides, models=[entry], default_model=given["name"])


def _version(value: bool) -> None:
    if value:
        print(f"visionserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    pass


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[Optional[str], typer.Option(help="address to listen on (0.0.0.0 to expose it)", show_default="127.0.0.1")] = None,
    port: Annotated[Optional[int], typer.Option(help="port", show_default="9130")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="model to serve, NAME or NAME@VERSION (repeatable); the first is the default")] = None,
    model_dir: ModelDirOpt = None,
    mirror: MirrorOpt = None,
    log_format: Annotated[Optional[str], typer.Option(help="text or json")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning or error")] = None,
) -> None:
    """Run the HTTP server."""
    from visionserve.server.logs import configure_logging

    global _json_logs
    wanted = log_format or os.environ.get("VISIONSERVE_LOG_FORMAT", "")
    if wanted.lower() == "json":  # even a configuration error is then a JSON line
        configure_logging("json", "info")
        _json_logs = True

    settings = _settings(
        config, host=host, port=port, models=model, model_dir=model_dir, model_mirror=mirror,
        log_format=log_format, log_level=log_level,
    )
    configure_logging(settings.log_format, settings.log_level)
    _json_logs = settings.log_format == "json"
    from visionserve.server.listener import bind

    try:
        sock = bind(settings.host, settings.port)
    except OSError as e:
        _error(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}")
        raise typer.Exit(3) from None
    workers = None
    if settings.runtime.worker_mode == "processes":
        # The inference process imports ONNX Runtime and OpenCV while this one imports the
        # HTTP stack: ready about 0.3 s sooner than one after the other.
        from visionserve.runtime.workers import WorkerPool

        workers = WorkerPool.for_runtime(settings.runtime)
        workers.spawn()
    from visionserve.server.app import create_app
    from visionserve.server.lifecycle import serve as serve_app
    from visionserve.store.store import ModelStore

    store = ModelStore(settings.model_dir, settings.model_mirror)
    for m in settings.models:  # pull missing catalog models before listening
        if m.path is None and not _installed(store, m.name) and not _pull(store, m.name):
            raise typer.Exit(1)
    if not serve_app(create_app(settings, workers), sock, settings.queue.drain_timeout_s):
        raise typer.Exit(3)


@app.command()
def healthcheck(
    config: ConfigOpt = None,
    url: Annotated[Optional[str], typer.Option(help="the server's base URL", show_default="from the configured port")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds to wait for the answer")] = 2.0,
) -> None:
    """Ask a running server whether it is ready (/readyz): exit 0 if it is, else 1 with the
    reason on one line. For container health checks; the port comes from the same settings
    (VISIONSERVE_PORT, the config file) as the server's."""
    import httpx

    if url is None:
        settings = _settings(config)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"
    try:
        r = httpx.get(url.rstrip("/") + "/readyz", timeout=timeout)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as e:
        _error(f"--url {url!r} is not a server's base URL ({e})")
        raise typer.Exit(2) from None
    except httpx.HTTPError as e:
        print(f"unhealthy: no answer from {url} ({type(e).__name__})")
        raise typer.Exit(1) from None
    if r.status_code == 200:
        print("ready")
        return
    try:
        error = r.json()["error"]
        reason = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        reason = f"HTTP {r.status_code}"
    print(f"not ready: {reason}")
    raise typer.Exit(1)


@app.command()
def detect(
    # readable=False: one unreadable path is that image's error (or the folder's line), as a
    # missing one is, not a usage error that stops every other image.
    paths: Annotated[list[Path], typer.Argument(help="images or folders of images", readable=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model name, or NAME@VERSION", show_default="the configured default")] = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="jsonl or csv")] = "jsonl",
    annotate_dir: Annotated[Optional[Path], typer.Option("--annotate", help="write images with boxes drawn here")] = None,
    min_confidence: Annotated[Optional[float], typer.Option(min=0, max=1)] = None,
    iou: Annotated[Optional[float], typer.Option(min=0, max=1)] = None,
    max_detections: Annotated[Optional[int], typer.Option(min=1)] = None,
    classes: Annotated[Optional[str], typer.Option(help="comma-separated labels to keep")] = None,
    config: ConfigOpt = None,
    model_dir: ModelDirOpt = None,
    mirror: MirrorOpt = None,
) -> None:
    """Detect objects in images offline; one JSON line (or CSV row per detection) per image on stdout."""
    from visionserve.offline import OfflineDetector

    if output_format not in ("jsonl", "csv"):
        _error("--format must be jsonl or csv")
        raise typer.Exit(2)
    if sys.stdout is None:  # started with stdout closed: the results would go nowhere
        _error("stdout is closed: nowhere to write the results")
        raise typer.Exit(2)
    # A file name that is not valid in the locale's encoding is written as the bytes it has
    # (JSON escapes it anyway), so that it names the file.
    sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    unreadable: list[OSError] = []
    found = list(_image_files(paths, unreadable))
    for e in unreadable:
        _error(f"{e.filename}: cannot list this folder ({e.strerror or e}): its images are left out")
    if not found:
        _error("no images found")
        raise typer.Exit(2)
    files = [path for path, _ in found]
    drawn = _annotation_paths(found, annotate_dir) if annotate_dir is not None else {}
    if annotate_dir is not None:
        _check_writable(annotate_dir)
    params = _params(min_confidence, iou, max_detections, classes)
    if params.classes is not None and not params.classes:
        _error("--classes names no label")
        raise typer.Exit(2)
    settings = _settings_for_model(config, model, model_dir=model_dir, model_mirror=mirror)
    try:
        with _download_bars() as bars:
            detector = OfflineDetector(settings, model_entry(model)["name"] if model else None, progress=bars)
        detector.model.thresholds(params)  # an unknown label is a mistake in the arguments, not in each image
    except InvalidParameter as e:
        _error(f"--classes: {e.message.removeprefix('classes: ')}")
        raise typer.Exit(2) from None
    except VisionServeError as e:
        _error(_described(e))
        raise typer.Exit(1) from None
    writer = csv.writer(sys.stdout) if output_format == "csv" else None
    if writer:
        writer.writerow(["file", "label", "class_id", "confidence", "x1", "y1", "x2", "y2"])
    failures = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, disable=len(files) < 2 or not err.is_terminal) as bar:
        task = bar.add_task("detecting", total=len(files))
        for path in files:
            try:
                record = detector.detect_file(path, params, drawn.get(path))
            except VisionServeError as e:
                failures += 1
                record = {"file": str(path), "error": {"code": e.code, "message": e.message}}
                if writer is not None:  # a CSV has no place for it
                    _error(f"{path}: {e.message}")
            if writer is None:
                print(json.dumps(record), flush=True)
            else:
                for d in record.get("detections", []):
                    b = d["box"]
                    writer.writerow([path, d["label"], d["class_id"], d["confidence"], b["x1"], b["y1"], b["x2"], b["y2"]])
            bar.advance(task)
    if failures:
        err.print(f"[yellow]{failures} of {len(files)} images could not be processed[/yellow]")
    if failures or unreadable:
        raise typer.Exit(1)


def _params(min_confidence, iou, max_detections, classes):  # type: ignore[no-untyped-def]
    from visionserve.types import PredictParams

    return PredictParams(min_confidence, iou, max_detections, PredictParams.parse_classes(classes or None))


def _image_files(paths: list[Path], unreadable: list[OSError]) -> Iterator[tuple[Path, Path]]:
    """Each image with its path relative to the folder it was found in (its name, for a file).
    Folders below those given that cannot be listed go to ``unreadable`` (``rglob`` skips
    them without a word)."""
    for p in paths:
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES):
                yield f, f.relative_to(p)
            for _ in os.walk(p, onerror=unreadable.append):
                pass
        else:
            yield p, Path(p.name)


def _check_writable(folder: Path) -> None:
    """Exit 2 unless drawings can be written in ``folder`` (made if missing): a file there, or
    a folder that refuses writes, would otherwise fail every image after its detection."""
    if folder.exists() and not folder.is_dir():
        _error(f"--annotate {folder}: not a folder")
        raise typer.Exit(2)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # named by the folder, not by the trial file in it
        _error(f"--annotate: cannot write drawings in it: {os_error_line(type(e)(e.errno, e.strerror, str(folder)))}")
        raise typer.Exit(2) from None


def _annotation_paths(found: list[tuple[Path, Path]], folder: Path) -> dict[Path, Path]:
    """Where each image's drawing goes: the folder, then the image's path under the folder it
    was found in, as JPEG. Checked before any work: a drawing may not replace an input, nor
    another drawing."""
    inputs = {path.resolve(): path for path, _ in found}
    drawn: dict[Path, Path] = {}
    by_output: dict[Path, Path] = {}
    for path, relative in found:
        out = folder / relative.with_suffix(".jpg")
        key = out.resolve()
        if key in inputs:
            _error(f"--annotate {folder}: the drawing of {path} would replace the input {inputs[key]}")
            raise typer.Exit(2)
        if (other := by_output.get(key)) is not None:
            _error(f"--annotate {folder}: {other} and {path} would both be drawn to {out}")
            raise typer.Exit(2)
        by_output[key] = path
        drawn[path] = out
    return drawn


# -- models -------------------------------------------------------------------------------


def _store_folder(settings: Settings) -> Path:
    """The model store's folder; exit 2 when that path is a file (nothing would look installed)."""
    if settings.model_dir.exists() and not settings.model_dir.is_dir():
        _error(f"the model store {settings.model_dir} is a file, not a folder")
        raise typer.Exit(2)
    return settings.model_dir


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    config: ConfigOpt = None,
    model_dir: ModelDirOpt = None,
) -> None:
    """The catalog, and which models are installed in the local store."""
    from visionserve.store.catalog import CATALOG
    from visionserve.store.store import ModelStore

    settings = _settings(config, model_dir=model_dir)
    store = ModelStore(_store_folder(settings), settings.model_mirror)
    # By folder: a version made by `models optimize` is listed as NAME@VERSION beside its model.
    broken: dict[str, ModelError] = {}
    installed = {m.folder.name if m.folder else m.name: m for m in store.installed(broken=broken.__setitem__)}
    rows = [
        {"name": name, "family": e.family, "input": f"{e.input_width}x{e.input_height}", "classes": len(e.labels),
         "installed": name in installed, "backend": installed[name].backend if name in installed else "onnxruntime",
         "description": e.description}
        for name, e in sorted(CATALOG.items())
    ] + [
        {"name": ref, "family": m.family, "input": f"{m.input_width}x{m.input_height}", "classes": len(m.labels),
         "installed": True, "backend": m.backend, "description": m.description or f"({m.source})"}
        for ref, m in sorted(installed.items()) if ref not in CATALOG
    ]
    for folder, e in broken.items():  # listed, so that a broken folder is seen and fixed
        _error(f"{folder}: {e.message}")
    if as_json:
        print(json.dumps({"store": str(store.root), "models": rows}, indent=2))
        return
    table = Table(title=f"models (store: {store.root})")
    for col in ("name", "family", "input", "classes", "installed", "engine", "description"):
        table.add_column(col, no_wrap=col != "description")
    for r in rows:
        cells = (r["name"], r["family"], r["input"], str(r["classes"]), "yes" if r["installed"] else "no", r["backend"],
                 r["description"])
        table.add_row(*(escape(c) for c in cells))
    # Piped (to grep, say), Rich would fit the table to 80 columns and cut the names short.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str], typer.Argument(help="catalog model names")],
    force: Annotated[bool, typer.Option(help="download again even if installed")] = False,
    config: ConfigOpt = None,
    model_dir: ModelDirOpt = None,
    mirror: MirrorOpt = None,
) -> None:
    """Download (from the mirror first), verify and install catalog models."""
    from visionserve.store.store import ModelStore

    settings = _settings(config, model_dir=model_dir, model_mirror=mirror)
    store = ModelStore(settings.model_dir, settings.model_mirror)
    failed = [name for name in names if not _pull(store, name, force=force)]  # each is tried
    if failed:
        raise typer.Exit(1)


def _installed(store, name: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether the store has the model; a broken one counts: the server serves the others and
    reports it failed, as it does a model whose file does not load."""
    try:
        return store.manifest(name) is not None
    except VisionServeError:
        return True


def _pull(store, name: str, force: bool = False) -> bool:  # type: ignore[no-untyped-def]
    """Pulls one model, saying how it went; False when it failed."""
    with _download_bars() as bars:
        try:
            manifest = store.pull(name, force=force, progress=bars)
        except VisionServeError as e:
            bars.stop()  # before the error: a bar drawn after it would hide it
            _error(_described(e))
            return False
    _note(f"{name}: installed in {manifest.folder} (verified)")
    return True


class _DownloadBars:
    """A progress bar per file downloaded (on a terminal only); ``stop`` clears them all."""

    def __init__(self) -> None:
        self._shown: list[Progress] = []

    def __call__(self, filename: str):  # type: ignore[no-untyped-def]
        progress = Progress(TextColumn(filename), BarColumn(), DownloadColumn(), console=err, transient=True,
                            disable=not err.is_terminal)
        self._shown.append(progress)
        task = progress.add_task(filename, total=None)
        started = False

        def update(done: int, total: int | None) -> None:
            nonlocal started
            if not started:
                progress.start()
                started = True
            progress.update(task, completed=done, total=total)
            if total is not None and done >= total:
                progress.stop()

        return update

    def stop(self) -> None:
        for progress in self._shown:
            progress.stop()


@contextlib.contextmanager
def _download_bars() -> Iterator[_DownloadBars]:
    bars = _DownloadBars()
    try:
        yield bars
    finally:
        bars.stop()


@models_app.command("verify")
def models_verify(
    names: Annotated[Optional[list[str]], typer.Argument(help="models to check", show_default="all installed")] = None,
    config: ConfigOpt = None,
    model_dir: ModelDirOpt = None,
) -> None:
    """Re-hash installed models' files against the catalog; exit 1 on any mismatch."""
    from visionserve.store.manifest import MANIFEST_NAME
    from visionserve.store.store import FileCheck, ModelStore, is_store_name

    settings = _settings(config, model_dir=model_dir)
    store = ModelStore(_store_folder(settings), settings.model_mirror)
    # Every folder with a manifest, a model whose file is gone included (a FAIL, not skipped).
    targets = names or store.written()
    if not targets:
        err.print("no models installed")
        raise typer.Exit(1)
    out = Console(soft_wrap=True)  # a line per file, however narrow the terminal, for grep and scripts
    bad = 0
    for name in sorted(targets):
        if not is_store_name(name):  # a path ("../x", "/abs") would check a folder outside the store
            checks = [FileCheck(name, False, "not a model name")]
        else:
            try:
                checks = store.verify(name)
            except ModelError as e:  # its manifest is broken: the one check that fails
                checks = [FileCheck(MANIFEST_NAME, False, e.message)]
        for check in checks:
            mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
            out.print(f"{mark} {escape(f'{name}/{check.name}: {check.detail}')}", highlight=False)
            bad += not check.ok
    if bad:
        raise typer.Exit(1)


@models_app.command("import-darknet")
def models_import_darknet(
    cfg: Annotated[Path, typer.Argument(help="darknet .cfg file", exists=True, dir_okay=False)],
    weights: Annotated[Path, typer.Argument(help="darknet .weights file", exists=True, dir_okay=False)],
    labels: Annotated[Path, typer.Option("--labels", help="class names, one a line (.names)", exists=True, dir_okay=False)],
    name: Annotated[Optional[str], typer.Option("--name", help="model name", show_default="the cfg's file name")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="replace a model of that name already installed")] = False,
    config: ConfigOpt = None,
    model_dir: ModelDirOpt = None,
) -> None:
    """Convert a darknet model (cfg + weights) to ONNX in the model store; serve it with --model NAME."""
    from visionserve.config import MODEL_NAME
    from visionserve.darknet import import_darknet
    from visionserve.store.catalog import CATALOG
    from visionserve.store.manifest import MANIFEST_NAME

    settings = _settings(config, model_dir=model_dir)
    name = name or cfg.stem
    if not MODEL_NAME.fullmatch(name):  # also a folder of the store: never a path
        _error(f"{name!r} is not a model name: letters, digits, '.', '_' and '-' (give one with --name)")
        raise typer.Exit(2)
    if name in CATALOG:  # its folder is the catalog's: pull and verify would take the import for it
        _error(f"{name!r} is a catalog model's name: give the import another with --name")
        raise typer.Exit(2)
    installed = settings.model_dir / name / MANIFEST_NAME
    if installed.exists() and not replace:
        _error(f"{name!r} is installed already: --replace replaces it, or give the import another name with --name")
        raise typer.Exit(2)
    try:
        manifest = import_darknet(cfg, weights, labels, settings.model_dir / name, name)
    except VisionServeError as e:
        _error(_described(e))
        raise typer.Exit(1) from None
    err.print(
        f"{name}: {manifest.family}, {manifest.input_width}x{manifest.input_height}, {len(manifest.labels)} classes, "
        f"installed in {manifest.folder}",
        highlight=False,
        markup=False,
    )
    stale = sorted(p.name for p in settings.model_dir.glob(f"{name}@*") if (p / MANIFEST_NAME).is_file())
    if stale:  # built from the graph replaced: they would go on serving it under this name
        _note(f"made from the model replaced, so make them again (visionserve models optimize {name}): {', '.join(stale)}")


@models_app.command("optimize")
def models_optimize(
    name: Annotated[str, typer.Argument(help="installed model to optimize")],
    calibration: Annotated[Path, typer.Option("--calibration", help="folder (or file) of representative images", exists=True)],
    evaluate: Annotated[Optional[Path], typer.Option("--eval", help="images to compare detections on", show_default="the calibration images", exists=True)] = None,
    output_version: Annotated[Optional[str], typer.Option("--output-version", help="version name of the result", show_default="the recipe's name")] = None,
    min_agreement: Annotated[float, typer.Option(min=0, max=1, help="share of detections a version's must match the float model's in (of the larger count)")] = 0.95,
    min_speedup: Annotated[float, typer.Option(min=0, help="throughput a version must reach, relative to float")] = 1.05,
    seconds: Annotated[float, typer.Option(min=0.2, help="seconds per speed measurement round")] = 2.0,
    recipe: Annotated[
        Optional[list[str]],
        typer.Option(
            "--recipe",
            help="a version to try (repeatable): int8, int8-mixed, openvino, openvino-bf16, openvino-int8",
            show_default="every one whose engine is installed",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    config: ConfigOpt = None,
    model_dir: ModelDirOpt = None,
    mirror: MirrorOpt = None,
) -> None:
    """Build faster versions of a model (ONNX Runtime INT8; OpenVINO float, BF16 and INT8 when
    OpenVINO is installed), measure them here against the float model, and install the fastest
    one whose detections agree, as NAME@VERSION (serve it with [\\[models]] name = NAME,
    version = VERSION)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime.quantization") is None:
        # The container image leaves ONNX Runtime's model-conversion tools out (docs/container.md).
        _error("models optimize needs ONNX Runtime's quantization tools, which this installation leaves out "
               "(the container image does); run it where visionserve is pip-installed, on the same kind of "
               "CPU, and copy the NAME@VERSION folder into this model store")
        raise typer.Exit(2)
    from visionserve.optimize import chosen_recipes, optimize_model
    from visionserve.store.store import ModelStore, check_version_name

    settings = _settings(config, model_dir=model_dir, model_mirror=mirror)
    store = ModelStore(settings.model_dir, settings.model_mirror)
    unreadable: list[OSError] = []  # a partial set of images would measure something else
    calibration_images = [path for path, _ in _image_files([calibration], unreadable)]
    eval_images = [path for path, _ in _image_files([evaluate], unreadable)] if evaluate else None
    for e in unreadable:
        _error(f"{e.filename}: cannot list this folder ({e.strerror or e})")
    if unreadable:
        raise typer.Exit(2)
    for folder, found in ((calibration, calibration_images), (evaluate, eval_images)):
        if folder is not None and not found:
            _error(f"no images in {folder}")
            raise typer.Exit(2)
    try:
        # Mistakes in the arguments are reported before anything is downloaded or built.
        recipes = chosen_recipes(recipe)
        if output_version is not None:
            check_version_name(output_version)
        if store.manifest(name) is None:
            store.ensure(name)
        # ONNX Runtime's quantizer prints progress on stdout: keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            report = optimize_model(
                store, name, calibration_images, eval_images, output_version=output_version,
                min_agreement=min_agreement, min_speedup=min_speedup, seconds=seconds, recipes=recipes,
            )
    except VisionServeError as e:
        _error(_described(e))
        raise typer.Exit(1) from None
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())


def main() -> None:
    try:
        app()
    except OSError as e:
        # The machine's part (a full disk, a folder that cannot be written, a path through a
        # file): one line naming the file, not a traceback. (Click already ends quietly when
        # the reader of stdout goes away, `| head`.)
        _error(os_error_line(e))
        sys.exit(1)


def os_error_line(e: OSError) -> str:
    """One line for an error of the machine's: what went wrong and on which file. A refused
    access also names the user, since the usual cause is a folder mounted into the container
    (which runs as uid 10001) that belongs to someone else."""
    line = f"{e.strerror or e}: {e.filename}" if e.filename else (e.strerror or str(e))
    if isinstance(e, PermissionError) and e.filename:
        line += f" (visionserve runs as uid {os.getuid()}: give that user access to it)"
    return line
