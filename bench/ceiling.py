"""The in-process ceiling: decode + preprocess + inference + postprocess of one image in a
tight loop, no HTTP. The server's throughput is measured against this number.

  (a) single image, one session using every core (intra-op threads = cores);
  (b) throughput with N workers (processes by default), each with a single-threaded session.

    PYTHONPATH=src python -m bench.ceiling --model yolox-nano --image dog.jpg --seconds 10 [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from visionserve.config import Settings  # noqa: E402
from visionserve.imaging.decode import decode_image  # noqa: E402
from visionserve.runtime.model import ServedModel  # noqa: E402
from visionserve.runtime.cpus import cpu_count, cpu_policy_in_force, use_thread_settings  # noqa: E402
from visionserve.store.manifest import ModelManifest  # noqa: E402
from visionserve.store.store import ModelStore  # noqa: E402
from visionserve.types import PredictParams  # noqa: E402

DEFAULT_MIRROR = str(REPO.parent / "shared" / "models")
DEFAULT_IMAGE = Path(os.environ.get("VISIONSERVE_MODEL_MIRROR", DEFAULT_MIRROR)) / "test_images" / "dog.jpg"


def resolve_manifest(model: str, model_dir: Path | None) -> ModelManifest:
    """An installed model or reference (``name@version``), pulling catalog models from the mirror."""
    settings = Settings()
    store = ModelStore(model_dir or settings.model_dir, os.environ.get("VISIONSERVE_MODEL_MIRROR", DEFAULT_MIRROR))
    return store.ensure(model)


def one_image(model: ServedModel, data: bytes, max_pixels: int) -> dict[str, float]:
    """The server's path for one upload, minus HTTP: ms per stage."""
    thresholds = model.thresholds(PredictParams())
    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels, min_size=model.decode_min_size())
    timings = {"decode": (time.perf_counter() - t0) * 1e3}
    detections = model.predict(image.pixels, thresholds, timings)
    detections.scaled(image.scale_x, image.scale_y, image.width, image.height)
    timings["total"] = (time.perf_counter() - t0) * 1e3
    return timings


def loop(model: ServedModel, data: bytes, seconds: float, max_pixels: int) -> list[dict[str, float]]:
    one_image(model, data, max_pixels)  # warm caches and the arena
    runs = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        runs.append(one_image(model, data, max_pixels))
    return runs


def stats(runs: list[dict[str, float]], elapsed: float) -> dict:
    total = np.array([r["total"] for r in runs])
    return {
        "images": len(runs),
        "images_per_s": round(len(runs) / elapsed, 2),
        "ms_p50": round(float(np.percentile(total, 50)), 3),
        "ms_p90": round(float(np.percentile(total, 90)), 3),
        "ms_p99": round(float(np.percentile(total, 99)), 3),
        "stage_ms_p50": {
            k: round(float(np.median([r[k] for r in runs])), 3)
            for k in ("decode", "preprocess", "inference", "postprocess")
        },
    }


def load_model(manifest: ModelManifest, intra_op_threads: int) -> ServedModel:
    """The model with the server's runtime settings (its config file and ``VISIONSERVE_RUNTIME__*``
    variables, e.g. ``allow_spinning``), at ``intra_op_threads`` threads."""
    runtime = Settings().runtime.model_copy(update={"intra_op_threads": intra_op_threads})
    model = ServedModel(manifest, runtime)
    model.load()
    return model


def _worker(manifest_json: str, folder: str, data: bytes, seconds: float, max_pixels: int, start, results) -> None:
    manifest = ModelManifest.model_validate({**json.loads(manifest_json), "folder": Path(folder)})
    model = load_model(manifest, 1)
    one_image(model, data, max_pixels)
    start.wait()
    results.put(loop(model, data, seconds, max_pixels))


def single(manifest: ModelManifest, data: bytes, seconds: float, max_pixels: int, threads: int) -> dict:
    model = load_model(manifest, threads)
    t0 = time.perf_counter()
    runs = loop(model, data, seconds, max_pixels)
    return {"intra_op_threads": threads, **stats(runs, time.perf_counter() - t0)}


def parallel(manifest: ModelManifest, data: bytes, seconds: float, max_pixels: int, workers: int, mode: str) -> dict:
    """``workers`` single-threaded models running at once; started together after loading."""
    if mode == "threads":
        models = [load_model(manifest, 1) for _ in range(workers)]
        out: list[list[dict[str, float]]] = [[] for _ in range(workers)]
        barrier = threading.Barrier(workers + 1)

        def run(i: int) -> None:
            barrier.wait()
            out[i] = loop(models[i], data, seconds, max_pixels)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        runs = [r for rs in out for r in rs]
    else:
        ctx = mp.get_context("spawn")
        start, results = ctx.Barrier(workers + 1), ctx.Queue()
        procs = [
            ctx.Process(
                target=_worker,
                args=(manifest.model_dump_json(), str(manifest.folder), data, seconds, max_pixels, start, results),
                daemon=True,
            )
            for _ in range(workers)
        ]
        for p in procs:
            p.start()
        start.wait(timeout=300)
        t0 = time.perf_counter()
        runs = [r for _ in procs for r in results.get(timeout=seconds + 300)]
        elapsed = time.perf_counter() - t0
        for p in procs:
            p.join(timeout=30)
    return {"workers": workers, "mode": mode, **stats(runs, elapsed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolox-nano", help="installed model or name@version")
    parser.add_argument("--model-dir", type=Path, default=None, help="model store (default: the server's)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=cpu_count())
    parser.add_argument("--mode", choices=("processes", "threads"), default="processes")
    parser.add_argument("--max-pixels", type=int, default=50_000_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    # The server's process-wide settings too (GIL switch interval, CPU policy); the worker
    # processes inherit the policy.
    use_thread_settings(Settings().runtime)
    manifest = resolve_manifest(args.model, args.model_dir)
    data = args.image.read_bytes()
    result = {
        "model": manifest.name,
        "version": manifest.version,
        "image": str(args.image),
        "cores": cpu_count(),
        "cpu_policy": cpu_policy_in_force(),
        "single": single(manifest, data, args.seconds, args.max_pixels, cpu_count()),
        "throughput": parallel(manifest, data, args.seconds, args.max_pixels, args.workers, args.mode),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{manifest.name} v{manifest.version}, {args.image.name}, {result['cores']} cores")
    for key, label in (("single", f"single image, {cpu_count()} intra-op threads"),
                       ("throughput", f"{args.workers} {args.mode}, 1 thread each")):
        r = result[key]
        stages = "  ".join(f"{k} {v:.2f}" for k, v in r["stage_ms_p50"].items())
        print(f"  {label:36s} {r['images_per_s']:8.1f} img/s  ms p50 {r['ms_p50']:.2f}  p90 {r['ms_p90']:.2f}  "
              f"p99 {r['ms_p99']:.2f}   [{stages}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
