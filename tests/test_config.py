"""Settings precedence (CLI > env > TOML > defaults) and errors that name the bad key."""

import pytest

from visionserve.config import load_settings
from visionserve.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("VISIONSERVE_"):
            monkeypatch.delenv(key)


def test_defaults():
    s = load_settings()
    assert (s.host, s.port, s.default_model) == ("127.0.0.1", 9130, "yolox-nano")
    assert s.limits.max_body_bytes == 20_000_000 and s.limits.max_image_pixels == 50_000_000


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 1000\nhost = "0.0.0.0"\nlog_format = "json"\n[limits]\nmax_body_bytes = 5\n')
    s = load_settings(cfg)
    assert (s.port, s.host, s.log_format, s.limits.max_body_bytes) == (1000, "0.0.0.0", "json", 5)
    monkeypatch.setenv("VISIONSERVE_PORT", "2000")
    monkeypatch.setenv("VISIONSERVE_LIMITS__MAX_BODY_BYTES", "6")
    s = load_settings(cfg)
    assert (s.port, s.host, s.limits.max_body_bytes) == (2000, "0.0.0.0", 6)
    s = load_settings(cfg, port=3000, host=None)
    assert (s.port, s.host) == (3000, "0.0.0.0")


def test_models_from_toml_and_env(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('default_model = "b"\n[[models]]\nname = "a"\nmin_confidence = 0.5\n[[models]]\nname = "b"\n')
    s = load_settings(cfg)
    assert [m.name for m in s.models] == ["a", "b"] and s.default_model == "b" and s.models[0].min_confidence == 0.5
    monkeypatch.setenv("VISIONSERVE_MODELS", "x, y")
    s = load_settings()
    assert [m.name for m in s.models] == ["x", "y"] and s.default_model == "x"
    monkeypatch.setenv("VISIONSERVE_MODELS", '[{"name": "z", "iou": 0.3}]')
    assert load_settings().models[0].iou == 0.3


@pytest.mark.parametrize("toml,key", [
    ("prot = 1\n", "prot"),
    ("[limits]\nmax_body_bites = 3\n", "limits.max_body_bites"),
    ('port = "high"\n', "port"),
    ("port = 99999\n", "port"),
    ('[[models]]\nname = "a"\npath = "x.onnx"\n', "models.0"),
    ('default_model = "zz"\n', "default_model"),
    ('[runtime]\ngraph_optimization = "max"\n', "runtime.graph_optimization"),
    # Typos that would build threads or sessions until memory runs out:
    ("[runtime]\nintra_op_threads = 100000\n", "runtime.intra_op_threads"),
    ("[runtime]\ninference_workers = 2000\n", "runtime.inference_workers"),
])
def test_bad_config_names_the_key(tmp_path, toml, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert key in str(e.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3")
    with pytest.raises(ConfigError):
        load_settings(bad)


def test_readme_config_example_is_valid(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", readme, re.S)
    cfg = tmp_path / "readme.toml"
    cfg.write_text(example)
    s = load_settings(cfg)
    assert [m.name for m in s.models] == ["yolox-nano", "my-detector"] and s.models[1].family == "yolox"


def test_readme_error_table_lists_every_error_code():
    """The README's table is the error contract clients code against: every code the server
    can answer with has a row, with its status."""
    import re
    from pathlib import Path

    from visionserve import errors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = set(re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", readme, re.M))
    kinds = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.VisionServeError)]
    # The client has gone: no answer reaches it; `visionserve detect`'s own, never served.
    unseen = {errors.ClientDisconnected, errors.InputError, errors.OutputError}
    expected = {(str(c.status), c.code) for c in kinds if c not in unseen}
    assert expected <= rows, f"missing from README's error table: {sorted(expected - rows)}"


def test_log_level_and_format_in_any_case(monkeypatch):
    monkeypatch.setenv("VISIONSERVE_LOG_LEVEL", "DEBUG")
    assert load_settings(log_format="JSON").log_level == "debug"
    assert load_settings(log_format="JSON").log_format == "json"
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(log_level="LOUD")


def test_a_variable_that_names_no_setting_is_refused(monkeypatch):
    """A misspelt top-level variable was skipped (a nested one was refused), so a typo left
    the default in place without a word."""
    monkeypatch.setenv("VISIONSERVE_LOG_LEVL", "debug")
    with pytest.raises(ConfigError, match="VISIONSERVE_LOG_LEVL: names no setting"):
        load_settings()
    monkeypatch.delenv("VISIONSERVE_LOG_LEVL")
    monkeypatch.setenv("VISIONSERVE_CONFIG", "/nonexistent.toml")  # the CLI's, not a setting
    assert load_settings().log_level == "info"


def test_a_bad_json_variable_is_named_by_the_variable(monkeypatch):
    monkeypatch.setenv("VISIONSERVE_RUNTIME", "{bad")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "VISIONSERVE_RUNTIME: not a valid JSON value" in str(e.value) and "EnvSettingsSource" not in str(e.value)


def test_a_config_file_with_a_byte_order_mark_says_so(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"\xef\xbb\xbfport = 9131\n")
    with pytest.raises(ConfigError, match="starts with a UTF-8 byte-order mark"):
        load_settings(cfg)


def test_an_empty_host_is_refused_not_every_interface(monkeypatch):
    """Empty bound 0.0.0.0: an unset variable in a compose file opened the server to the network."""
    monkeypatch.setenv("VISIONSERVE_HOST", "")
    with pytest.raises(ConfigError, match="host: .*empty: give an address"):
        load_settings()
    for empty in (" ", "[]"):  # "[]" is empty once its brackets go
        with pytest.raises(ConfigError, match="host"):
            load_settings(host=empty)


def test_empty_store_and_mirror_variables_are_unset_not_the_current_folder(monkeypatch, tmp_path):
    from visionserve.config import default_model_dir

    monkeypatch.setenv("VISIONSERVE_MODEL_DIR", "")
    monkeypatch.setenv("VISIONSERVE_MODEL_MIRROR", "")
    s = load_settings()
    assert s.model_dir == default_model_dir() and s.model_dir.is_absolute() and s.model_mirror is None


def test_home_folders_are_expanded_and_an_unknown_users_is_refused(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("VISIONSERVE_MODEL_DIR", "~/models")
    monkeypatch.setenv("VISIONSERVE_MODEL_MIRROR", "~/mirror")
    s = load_settings()
    assert s.model_dir == Path.home() / "models" and s.model_mirror == str(Path.home() / "mirror")
    for key in ("VISIONSERVE_MODEL_DIR", "VISIONSERVE_MODEL_MIRROR"):
        monkeypatch.setenv(key, "~no-such-user-here/x")
        with pytest.raises(ConfigError, match="'~no-such-user-here': no such user's home folder here"):
            load_settings()
        monkeypatch.delenv(key)


def test_a_model_given_by_name_may_name_its_version(monkeypatch):
    """What `models optimize` prints (NAME@VERSION) is what --model and VISIONSERVE_MODELS take."""
    monkeypatch.setenv("VISIONSERVE_MODELS", "yolox-nano@int8, tiny-yolov2-voc")
    s = load_settings()
    assert [(m.name, m.version) for m in s.models] == [("yolox-nano", "int8"), ("tiny-yolov2-voc", None)]
    assert load_settings(models=["yolox-nano@openvino"]).models[0].version == "openvino"


def test_relative_paths_in_the_config_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    """As Prometheus and Compose read theirs: they were taken from the current folder, so a
    config kept beside its models broke when the server started anywhere else."""
    from pathlib import Path

    folder = tmp_path / "deploy"
    folder.mkdir()
    cfg = folder / "c.toml"
    cfg.write_text(
        'model_dir = "models"\nmodel_mirror = "mirror"\n'
        '[[models]]\nname = "mine"\npath = "onnx/mine.onnx"\nfamily = "yolox"\nlabels = "mine.names"\n'
        '[[models]]\nname = "listed"\npath = "/abs/x.onnx"\nfamily = "yolox"\nlabels = ["a", "b"]\n'
    )
    monkeypatch.chdir(tmp_path)
    s = load_settings(cfg)
    assert s.model_dir == folder / "models" and s.model_mirror == str(folder / "mirror")
    assert (s.models[0].path, s.models[0].labels) == (folder / "onnx/mine.onnx", folder / "mine.names")
    assert (s.models[1].path, s.models[1].labels) == (Path("/abs/x.onnx"), ["a", "b"])
    # The environment's and the command line's stay the current folder's, as any command's.
    monkeypatch.setenv("VISIONSERVE_MODEL_DIR", "here")
    assert load_settings(cfg).model_dir == Path("here")
    cfg.write_text('model_mirror = "http://127.0.0.1:9/m"\n')
    assert load_settings(cfg).model_mirror == "http://127.0.0.1:9/m"
