"""A short run of the benchmark suite (not its targets), so that bench/ never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionserve.runtime.scheduler import capacity_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_run(model_dir, mirror, images, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "VISIONSERVE_MODEL_DIR": str(model_dir), "VISIONSERVE_MODEL_MIRROR": str(mirror)}
    # Not the default image: the ceiling must measure the image the server is sent.
    image = images / "horses.jpg"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--levels", "1,16", "--rounds", "2",
         "--image", str(image), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # Two rounds, each with a ceiling of its own on the same image, and the levels after it.
    assert len(report["rounds"]) == 2
    for rnd in report["rounds"]:
        assert Path(rnd["ceiling"]["image"]).name == "horses.jpg"
        assert rnd["ceiling"]["throughput"]["images_per_s"] > 0
        assert [lv["concurrency"] for lv in rnd["levels"]] == [1, 16]
    assert report["rounds"][0]["ceiling"] != report["rounds"][1]["ceiling"]
    # The targets are judged on the medians of the rounds' own ratios.
    c16_target = report["targets"]["c16_vs_ceiling"]
    ratios = [rnd["levels"][1]["ok_per_s"] / rnd["ceiling"]["throughput"]["images_per_s"] for rnd in report["rounds"]]
    assert c16_target["per_round"] == pytest.approx(ratios) and c16_target["median"] == pytest.approx(sum(ratios) / 2)
    assert len(report["targets"]["c1_p50_over_single_ms"]["per_round"]) == 2
    assert report["rounds"][report["median_round"] - 1]["levels"] == report["levels"]
    for lv in report["levels"]:
        assert lv["ok"] > 0 and lv["errors"] == 0 and lv["p50_ms"] > 0
        # Where the cores went: the workers decode and run the model, the event loop only
        # serves HTTP, and wrk spends some too.
        cpu = lv["cpu_ms_per_ok"]
        assert cpu["workers"] > cpu["event_loop"] > 0 and cpu["load_generator"] > 0, cpu
        # The loop sleeps while its request is in a worker: at least once per answer at c=1.
        switches = lv["switches_per_ok"]
        assert set(switches) == {"event_loop_sleeps", "event_loop_preempted", "workers_preempted"}, switches
        assert switches["event_loop_sleeps"] >= (1 if lv["concurrency"] == 1 else 0.1), switches
    assert report["exit_code"] == 0 and report["ready_s"] > 0 and report["peak_rss_mb"] > 0
    # The ceiling runs under the server's CPU policy (runtime.cpu_policy), as the server does.
    assert report["ceiling"]["cpu_policy"] == "batch"
    # 16 connections exceed the default capacity (on fewer than 11 cores): the excess is
    # refused, and the refused clients wait the Retry-After they were sent (a storm makes
    # thousands per second).
    c16 = report["levels"][1]
    assert report["clients"] == "retry-after"
    assert c16["refused_503"] / c16["duration_s"] < 200, c16
    if 16 > capacity_for(len(os.sched_getaffinity(0)), None):
        assert c16["refused_503"] > 0, c16
    assert "ok/s" in proc.stdout
