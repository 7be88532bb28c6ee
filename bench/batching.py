#!/usr/bin/env python3
"""When does dynamic batching pay on this CPU? In-process, no HTTP.

For batch sizes 1, 2, 4, 8 of YOLOX-Nano's batch-capable variant (made in memory by
visionserve.runtime.batching), measures images/s of inference alone in the two layouts the
scheduler uses: one single-threaded session per core run side by side, and one session
using all cores. Prints a table (``--json`` for raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from visionserve.config import RuntimeSettings  # noqa: E402
from visionserve.runtime.batching import dynamic_batch_variant  # noqa: E402
from visionserve.runtime.cpus import cpu_count  # noqa: E402
from visionserve.runtime.session import create_session  # noqa: E402
from visionserve.store.store import ModelStore  # noqa: E402


def throughput(sessions: list, batch: np.ndarray, seconds: float) -> float:
    counts = [0] * len(sessions)
    name = sessions[0].get_inputs()[0].name
    for s in sessions:
        s.run(None, {name: batch})
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            sessions[i].run(None, {name: batch})
            counts[i] += len(batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    mirror = os.environ.get("VISIONSERVE_MODEL_MIRROR", str(REPO.parent / "shared" / "models"))
    model_dir = Path(os.environ.get("VISIONSERVE_MODEL_DIR") or "/tmp/visionserve-bench-models")
    manifest = ModelStore(model_dir, mirror=mirror).ensure("yolox-nano")
    variant = dynamic_batch_variant(manifest.path)
    assert variant is not None
    cores = cpu_count()
    rt = RuntimeSettings()
    workers = [create_session(variant, rt, intra_op_threads=1) for _ in range(cores)]
    wide = [create_session(variant, rt, intra_op_threads=cores)]
    rng = np.random.default_rng(0)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        batch = rng.uniform(0, 255, (size, 3, manifest.input_height, manifest.input_width)).astype(np.float32)
        rows.append({
            "batch": size,
            "workers_images_per_s": throughput(workers, batch, args.seconds),
            "wide_images_per_s": throughput(wide, batch, args.seconds),
        })
    if args.json:
        print(json.dumps({"cores": cores, "rows": rows}, indent=2))
        return
    print(f"{'batch':>5} {cores}x1-thread img/s {'1x' + str(cores) + '-thread img/s':>18}")
    for r in rows:
        print(f"{r['batch']:>5} {r['workers_images_per_s']:>18.1f} {r['wide_images_per_s']:>18.1f}")


if __name__ == "__main__":
    main()
