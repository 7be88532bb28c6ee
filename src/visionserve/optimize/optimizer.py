"""``optimize_model``: build candidates, measure them against the float model, keep the best."""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from visionserve.errors import ModelError
from visionserve.families import get_family
from visionserve.optimize.calibration import TensorReader, calibration_tensors, load_rgb
from visionserve.optimize.graph import prepare_float_graph
from visionserve.optimize.measure import Agreement, Speed, Variant, agreement, measure_speeds, served_detections
from visionserve.optimize.recipes import RECIPES, Quantization, Recipe, default_recipes
from visionserve.runtime.cpus import cpu_count
from visionserve.store.store import VERSION_SEP, ModelStore, check_derived_version, version_ref
from visionserve.types import Thresholds

FLOAT = "float"


@dataclass(slots=True)
class CandidateResult:
    name: str
    description: str
    backend: str  # the engine that runs it
    throughput: float  # images/s at full load
    speedup: float  # throughput / float model's throughput, same run
    cpu_ms: float  # CPU ms per inference at full load
    cpu_speedup: float  # float model's cpu_ms / this one's
    latency_ms: float  # one image, all cores
    agreement: float  # matched pairs over the larger of the two detection counts
    matched: int
    reference_detections: int
    candidate_detections: int
    build_s: float
    accepted: bool = False
    reason: str = ""


@dataclass(slots=True)
class OptimizeReport:
    model: str
    base_version: str
    cpu: str
    cores: int
    workers: int
    calibration_images: int
    calibration_tensors: int
    eval_images: int
    min_agreement: float
    min_speedup: float
    float_throughput: float
    float_cpu_ms: float
    float_latency_ms: float
    candidates: list[CandidateResult] = field(default_factory=list)
    chosen: str | None = None  # recipe name of the installed version
    installed: str | None = None  # store reference, ``name@version``

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.model} v{self.base_version} on {self.cpu} ({self.cores} cores), "
            f"{self.workers} single-threaded workers at full load:",
            f"  float          {self.float_throughput:7.1f} img/s  {self.float_cpu_ms:6.2f} CPU ms/inf  "
            f"{self.float_latency_ms:6.2f} ms latency",
        ]
        for c in self.candidates:
            lines.append(
                f"  {c.name:14s} {c.throughput:7.1f} img/s  {c.cpu_ms:6.2f} CPU ms/inf  {c.latency_ms:6.2f} ms latency  "
                f"x{c.speedup:.2f} (CPU x{c.cpu_speedup:.2f})  agreement {c.matched}/{max(c.reference_detections, c.candidate_detections)} "
                f"= {c.agreement:.0%}  {'ACCEPTED' if c.accepted else 'rejected: ' + c.reason}"
            )
        lines.append(f"  installed: {self.installed}" if self.installed else "  nothing installed: no candidate qualified")
        return "\n".join(lines)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def optimize_model(
    store: ModelStore,
    name: str,
    calibration_images: Sequence[Path],
    eval_images: Sequence[Path] | None = None,
    *,
    output_version: str | None = None,
    recipes: Iterable[Recipe | str] | None = None,
    min_agreement: float = 0.95,
    min_iou: float = 0.8,
    min_speedup: float = 1.05,
    augment: bool = True,
    workers: int | None = None,
    seconds: float = 2.0,
    rounds: int = 3,
) -> OptimizeReport:
    """Builds faster versions of an installed model (``recipes``, default: every recipe whose
    engine is installed here) and installs the fastest one whose detections agree with the
    float model's.

    A candidate qualifies when its detections on ``eval_images`` (default: the calibration
    images) pair one-to-one with the float model's (same label, IoU >= ``min_iou``) for at
    least ``min_agreement`` of the larger of the two counts (so that missed detections and
    extra ones both count against it), and its throughput at full load (``workers`` single-threaded sessions,
    default one per core) is at least ``min_speedup`` times the float model's in the same
    run. The winner goes into the store as ``<name>@<output_version or recipe name>``.
    """
    if VERSION_SEP in name:  # its "float" row would be that version, and its own version free to take
        raise ModelError(f"optimize starts from the model itself: give {name.split(VERSION_SEP)[0]!r}, not {name!r}")
    manifest = store.manifest(name)
    if manifest is None:
        raise ModelError(f"model {name!r} is not installed")
    if not calibration_images:
        raise ModelError("no calibration images given")
    candidates = chosen_recipes(recipes)
    if output_version is not None:  # refused before anything is built
        check_derived_version(manifest, output_version)
    # Minutes of building and measuring would end in a version that cannot be installed.
    store.check_writable([version_ref(name, output_version or r.name) for r in candidates])
    family = get_family(manifest.family)(manifest)
    role = "evaluation image" if eval_images else "calibration image"
    eval_pixels = [load_rgb(p, role) for p in (eval_images or calibration_images)]
    thresholds = Thresholds(manifest.min_confidence, manifest.iou, manifest.max_detections)
    workers = workers or cpu_count()

    with tempfile.TemporaryDirectory(prefix="visionserve-optimize-") as tmp_dir:
        tmp = Path(tmp_dir)
        tensors = calibration_tensors(family, calibration_images, augment=augment)
        variants = {FLOAT: Variant(manifest.path, manifest.backend, manifest.backend_options)}
        reference = served_detections(manifest, variants[FLOAT], eval_pixels, thresholds)
        if not any(len(d) for d in reference):
            raise ModelError(
                f"the float model finds nothing in the {role}s at its own thresholds: no detections to compare "
                "a faster version's against (give images with objects it detects, e.g. --eval DIR)"
            )
        built: dict[Quantization, Path] = {}  # recipes on several engines share one graph
        build_s: dict[str, float] = {}
        agreements: dict[str, Agreement] = {}
        failures: dict[str, str] = {}  # a recipe that cannot build or run here is rejected, not fatal
        for recipe in candidates:
            t0 = time.perf_counter()
            try:
                graph = manifest.path
                if recipe.quantization is not None:
                    if recipe.quantization not in built:
                        target = tmp / f"{manifest.path.stem}.{recipe.name}.onnx"
                        built[recipe.quantization] = _quantize(recipe.quantization, manifest.path, tensors, tmp, target)
                    graph = built[recipe.quantization]
                variant = Variant(graph, recipe.backend, dict(recipe.backend_options))
                build_s[recipe.name] = time.perf_counter() - t0
                detections = served_detections(manifest, variant, eval_pixels, thresholds)
            except Exception as e:  # noqa: BLE001 - the quantizer and the engines raise their own kinds
                message = (e.detail or e.message) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
                failures[recipe.name] = f"failed: {message}"
                continue
            variants[recipe.name] = variant
            agreements[recipe.name] = agreement(reference, detections, min_iou)
        speeds = measure_speeds(variants, tensors[0], workers=workers, seconds=seconds, rounds=rounds)

        base: Speed = speeds[FLOAT]
        report = OptimizeReport(
            model=name,
            base_version=manifest.version,
            cpu=cpu_model_name(),
            cores=cpu_count(),
            workers=workers,
            calibration_images=len(calibration_images),
            calibration_tensors=int(tensors.shape[0]),
            eval_images=len(eval_pixels),
            min_agreement=min_agreement,
            min_speedup=min_speedup,
            float_throughput=base.throughput,
            float_cpu_ms=base.cpu_ms,
            float_latency_ms=base.latency_ms,
        )
        for recipe in candidates:
            if recipe.name in failures:
                report.candidates.append(_failed(recipe, build_s.get(recipe.name, 0.0), failures[recipe.name]))
                continue
            s, a = speeds[recipe.name], agreements[recipe.name]
            result = CandidateResult(
                name=recipe.name,
                description=recipe.description,
                backend=recipe.backend,
                throughput=s.throughput,
                speedup=s.throughput / base.throughput,
                cpu_ms=s.cpu_ms,
                cpu_speedup=base.cpu_ms / s.cpu_ms,
                latency_ms=s.latency_ms,
                agreement=a.fraction,
                matched=a.matched,
                reference_detections=a.reference,
                candidate_detections=a.candidate,
                build_s=build_s[recipe.name],
            )
            if result.agreement < min_agreement:
                result.reason = f"agreement {result.agreement:.0%} < {min_agreement:.0%}"
            elif result.speedup < min_speedup:
                result.reason = f"speed-up x{result.speedup:.2f} < x{min_speedup:.2f}"
            else:
                result.accepted = True
            report.candidates.append(result)

        accepted = [c for c in report.candidates if c.accepted]
        if accepted:
            best = max(accepted, key=lambda c: c.throughput)
            version = output_version or best.name
            winner = variants[best.name]
            store.add_version(
                manifest, version, winner.path, description=f"{manifest.description}; {best.description}",
                backend=winner.backend, backend_options=winner.options,
            )
            report.chosen, report.installed = best.name, version_ref(manifest.name, version)
        return report


def _failed(recipe: Recipe, build_s: float, reason: str) -> CandidateResult:
    return CandidateResult(
        name=recipe.name, description=recipe.description, backend=recipe.backend, throughput=0.0, speedup=0.0,
        cpu_ms=0.0, cpu_speedup=0.0, latency_ms=0.0, agreement=0.0, matched=0, reference_detections=0,
        candidate_detections=0, build_s=build_s, reason=reason,
    )


def chosen_recipes(recipes: Iterable[Recipe | str] | None) -> list[Recipe]:
    """The recipes to try (each once, in the order given), checked before any work: an
    unknown name, or one whose engine is not installed, is an error."""
    chosen = list({r.name: r for r in map(_recipe, recipes)}.values()) if recipes else default_recipes()
    for recipe in chosen:
        recipe.require()
    return chosen


def _recipe(recipe: Recipe | str) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ModelError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    return RECIPES[recipe]


def _quantize(quantization: Quantization, model: Path, tensors: np.ndarray, tmp: Path, target: Path) -> Path:
    """The quantized graph: the float graph prepared once (opset, pre-processing), then
    ``quantize_static`` on the calibration tensors."""
    float_graph = tmp / "float.onnx"
    if not float_graph.exists():
        prepare_float_graph(model, float_graph)
    import onnx  # the input name, without a session

    input_name = onnx.load(str(float_graph), load_external_data=False).graph.input[0].name
    return quantization.build(float_graph, TensorReader(input_name, tensors), target)
