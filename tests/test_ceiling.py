"""The in-process ceiling benchmark runs the server's path on the real model and reports figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import ceiling


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_ceiling_json(
    model_dir: Path, images: Path, mode: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ceiling applies the server's process-wide settings to the process it runs in: keep
    # this one's as they are. (The bench smoke test checks the default policy, "batch", in a
    # process of its own.)
    monkeypatch.setenv("VISIONSERVE_RUNTIME__CPU_POLICY", "normal")
    monkeypatch.setenv("VISIONSERVE_RUNTIME__GIL_SWITCH_INTERVAL_MS", str(sys.getswitchinterval() * 1e3))
    code = ceiling.main([
        "--model-dir", str(model_dir), "--image", str(images / "dog.jpg"),
        "--seconds", "0.3", "--workers", "2", "--mode", mode, "--json",
    ])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["version"]) == ("yolox-nano", "1")
    assert result["single"]["intra_op_threads"] == result["cores"]
    assert (result["throughput"]["workers"], result["throughput"]["mode"]) == (2, mode)
    assert result["cpu_policy"] == "normal"
    for key in ("single", "throughput"):
        r = result[key]
        assert r["images"] > 0 and r["images_per_s"] > 0
        assert 0 < r["ms_p50"] <= r["ms_p90"] <= r["ms_p99"]
        assert set(r["stage_ms_p50"]) == {"decode", "preprocess", "inference", "postprocess"}
        assert all(v > 0 for v in r["stage_ms_p50"].values())


@pytest.mark.parametrize("spin", ["false", "true"])
def test_ceiling_uses_the_servers_runtime_settings(model_dir: Path, monkeypatch: pytest.MonkeyPatch, spin: str) -> None:
    monkeypatch.setenv("VISIONSERVE_RUNTIME__ALLOW_SPINNING", spin)
    model = ceiling.load_model(ceiling.resolve_manifest("yolox-nano", model_dir), 2)
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin == "true" else "0")
