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


@pytest.mark.parametrize("content, reason", [
    (lambda onnx: onnx[: len(onnx) // 2], "the model file is not a valid ONNX graph"),  # truncated
    (lambda onnx: b"", "the model file is not a valid ONNX graph"),
    (None, "the model file is missing"),
])
def test_a_model_file_that_does_not_load_says_why_without_naming_it(model_dir, tmp_path, content, reason):
    from visionserve.errors import ModelError
    from visionserve.runtime.session import create_session

    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content((model_dir / "yolox-nano" / "yolox_nano.onnx").read_bytes()))
    with pytest.raises(ModelError) as e:
        create_session(path, RuntimeSettings(), name=str(path))
    assert e.value.message == reason  # it can reach HTTP clients (load API, model status)
    assert str(path) in e.value.detail and "ONNXRuntimeError" in e.value.detail  # for the log


def test_an_unexpected_error_while_loading_keeps_its_text_for_the_log():
    import pickle

    from visionserve.runtime.worker_process import portable_error

    error = FileNotFoundError(2, "No such file or directory", "/srv/models/secret.onnx")
    loading = pickle.loads(pickle.dumps(portable_error(error, loading=True)))  # as it crosses the pipe
    assert loading.message == "unexpected FileNotFoundError while loading the model (the server log has the details)"
    assert "/srv/models/secret.onnx" in loading.detail
