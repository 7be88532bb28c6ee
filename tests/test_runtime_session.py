"""The ONNX Runtime sessions a served model gets: thread counts and spinning, read back from
the real sessions."""

from __future__ import annotations

import pytest

from visionserve.config import RuntimeSettings
from visionserve.runtime.model import ServedModel
from visionserve.store.store import ModelStore


def sessions(model_dir, mirror, **runtime) -> ServedModel:
    model = ServedModel(
        ModelStore(model_dir, str(mirror)).manifest("yolox-nano"),
        RuntimeSettings(intra_op_threads=2, inference_workers=2, **runtime),
    )
    model.load()
    return model


def config(session, key: str) -> str:
    return session.get_session_options().get_session_config_entry(key)


def test_threads_spin_during_a_run_and_stop_when_it_returns(model_dir, mirror):
    model = sessions(model_dir, mirror)
    assert model.has_wide_session
    assert model.session.get_session_options().intra_op_num_threads == 2
    assert [s.get_session_options().intra_op_num_threads for s in model.worker_sessions] == [1, 1]
    for s in (model.session, *model.worker_sessions):
        assert config(s, "session.intra_op.allow_spinning") == "1"
        # Without this, the wide session's idle thread would spin on after each run and take
        # a core from the single-threaded workers.
        assert config(s, "session.force_spinning_stop") == "1"


@pytest.mark.parametrize("spin", [False, True])
def test_allow_spinning_setting_reaches_every_session(model_dir, mirror, spin):
    model = sessions(model_dir, mirror, allow_spinning=spin)
    for s in (model.session, *model.worker_sessions):
        assert config(s, "session.intra_op.allow_spinning") == ("1" if spin else "0")
