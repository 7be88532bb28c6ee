"""Settings, from (highest precedence first): CLI flags, ``VISIONSERVE_*`` environment
variables, a TOML file, built-in defaults.

Nested keys use ``__`` in the environment: ``VISIONSERVE_LIMITS__MAX_BODY_BYTES=5000000``.
``VISIONSERVE_MODELS`` takes a comma-separated list of catalog names or a JSON list.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from visionserve.errors import ConfigError
from visionserve.runtime.settings import RuntimeSettings

DEFAULT_PORT = 9130
# Bounded so a name (also a folder in the model store) stays well under file-name limits.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _expand_user(path: Any) -> Any:
    """``path`` with a leading ``~`` or ``~user`` expanded; ValueError for a user unknown here."""
    if isinstance(path, (str, Path)) and str(path).startswith("~"):
        try:
            return Path(path).expanduser()
        except RuntimeError:  # ~nobody-here: Path's own error is a traceback's
            raise ValueError(f"{str(path).split('/')[0]!r}: no such user's home folder here") from None
    return path


def model_entry(text: str) -> dict[str, str]:
    """A model given by name: NAME, or NAME@VERSION for a version made by ``models optimize``."""
    name, _, version = text.partition("@")
    return {"name": name, "version": version} if version else {"name": name}


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "visionserve" / "models"


class ModelConfig(BaseModel):
    """A model to serve: a catalog name, or your own ONNX file with its family and labels."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME.pattern)
    path: Path | None = None
    family: str | None = None
    labels: Path | list[str] | None = None
    input_width: int | None = Field(default=None, gt=0)
    input_height: int | None = Field(default=None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    version: str | None = None
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    iou: float | None = Field(default=None, ge=0, le=1)
    max_detections: int | None = Field(default=None, ge=1, le=10_000)

    @field_validator("path", "labels", mode="before")
    @classmethod
    def _home(cls, value: Any) -> Any:
        return _expand_user(value)

    @model_validator(mode="after")
    def _own_file_needs_family(self) -> "ModelConfig":
        if self.path is not None and (self.family is None or self.labels is None):
            raise ValueError("a model given by 'path' also needs 'family' and 'labels'")
        return self


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=20_000_000, gt=0, description="request bodies above this get 413")
    # Headers are a few hundred bytes and arrive in one packet from any real client; 10 s is
    # generous even on a congested link (HAProxy's usual ``timeout http-request``), yet bounds
    # how long a connection that trickles or stalls its headers holds a socket (slowloris).
    header_timeout_s: float = Field(
        default=10.0, gt=0,
        description="a request's headers not complete this many seconds after the connection opened, or "
        "after the request's first byte on a kept-alive connection, close the connection (with 408 when part "
        "of a request had arrived)",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0,
        description="a kept-alive connection with no request for this many seconds is closed (uvicorn's "
        "default). Behind a load balancer or proxy that reuses connections, set it above the balancer's idle "
        "timeout (AWS ALB: 60 s), or the balancer sends requests down connections the server is closing and "
        "answers them 502",
    )
    # Real clients send well under 8 KB of headers (nginx reads up to 32 KB, Node.js 16 KB);
    # the bound is what one connection may make the server hold before its body.
    max_header_bytes: int = Field(
        default=65536, ge=1024,
        description="a request whose request line and headers exceed this many bytes gets 431 and the "
        "connection closes",
    )
    body_timeout_s: float = Field(
        default=10.0, gt=0,
        description="a request body not fully received this many seconds after the request began to read it "
        "gets 408: a slow upload holds memory, and until queue.upload_hold_ms a place too",
    )
    max_image_pixels: int = Field(default=50_000_000, gt=0, description="images above this many pixels get 413")


class QueueSettings(BaseModel):
    """Admission control, deadlines and dynamic batching (protocol-neutral: every API gets them)."""

    model_config = ConfigDict(extra="forbid")

    max_queue: int | None = Field(
        default=None, ge=0,
        description="requests admitted beyond those running (inference_workers); more get 503 with "
        "Retry-After at once. Each queued request adds about one image's time / workers to the wait. "
        "Default: one per two workers (at least one), so an accepted request waits about half an image's "
        "time behind the others; measured against one per worker: the p99 under overload 52 instead of "
        "61 ms, for 1-3% less throughput (docs/benchmarks.md)",
    )
    refusal_pause_ms: float = Field(
        default=20.0, ge=0, le=5000,
        description="after a 503 because the server is full, that connection's next request is read this "
        "much later (the 503 itself goes out at once): clients that re-send at once, ignoring Retry-After, "
        "then cannot make refusing them most of what the server does. 0 = off; measured under such a "
        "storm at 16 connections: 85-90 instead of 34-45 answers a second (docs/benchmarks.md)",
    )
    upload_hold_ms: float = Field(
        default=250.0, ge=0, le=60_000,
        description="an admitted detection request keeps its place while its body arrives for at most this "
        "long once the server is full; a slower upload then gives the place up and goes on arriving outside "
        "the capacity (see max_slow_uploads). With its body complete it needs a place again: a free one, or "
        "the next one freed (before any new request) if that comes within this long, else 503. So clients "
        "that send headers and stall cannot hold every place: they would need to open capacity / "
        "upload_hold_ms connections a second",
    )
    max_slow_uploads: int = Field(
        default=256, ge=0, le=100_000,
        description="requests whose bodies arrive outside the capacity at once (see upload_hold_ms); past "
        "it, a slow upload keeps its place. 0 = every upload keeps its place until its body is complete",
    )
    slow_upload_bytes: int = Field(
        default=64 * 2**20, ge=1,
        description="bytes the slow uploads (see upload_hold_ms) may have received together, so that they "
        "cannot fill the memory: an upload whose bytes do not fit keeps its place, and one that goes past "
        "it while aside gets 503 and its connection closes (each is also held to limits.max_body_bytes "
        "and limits.body_timeout_s)",
    )
    max_batch_size: int = Field(
        default=1, ge=1, le=256,
        description="images per inference for models with a batch dimension (1 = no batching)",
    )
    max_queue_delay_ms: float = Field(
        default=2.0, ge=0, description="how long the first image of a batch may wait for more"
    )
    default_timeout_ms: float | None = Field(
        default=None, gt=0,
        description="deadline for requests that set none; past it a request is dropped and answered 504",
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0,
        description="on SIGTERM, how long in-flight requests may take to finish, all of them together; those "
        "still running then get 503, and the process exits within about 3 s more (set a Kubernetes grace "
        "period above the sum)",
    )


class DeepStackSettings(BaseModel):
    """The DeepStack / CodeProject.AI detection API (``/v1/vision/...``)."""

    model_config = ConfigDict(extra="forbid")

    max_detections: int = Field(
        default=20, ge=1, le=10_000,
        description="at most this many predictions per answer; Frigate's DeepStack detector breaks on more than 20",
    )
    min_confidence: float = Field(default=0.4, ge=0, le=1, description="used when a request sends no min_confidence")
    api_key: SecretStr | None = Field(default=None, description="when set, requests must send this as form field api_key")


class V2Settings(BaseModel):
    """The Open Inference Protocol (``/v2/...``)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="most images in one inference request")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VISIONSERVE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    model_dir: Path = Field(default_factory=default_model_dir)
    model_mirror: str | None = None
    models: Annotated[list[ModelConfig], NoDecode] = Field(default_factory=lambda: [ModelConfig(name="yolox-nano")])
    default_model: str | None = None
    limits: Limits = Field(default_factory=Limits)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    deepstack: DeepStackSettings = Field(default_factory=DeepStackSettings)
    v2: V2Settings = Field(default_factory=V2Settings)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        # Empty binds every interface: an unset variable (VISIONSERVE_HOST= in a compose
        # file, say) must not open the server to the network. That takes 0.0.0.0, written.
        # "[::1]" as written in URLs: the address is what is inside the brackets.
        bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        if not bare.strip():
            raise ValueError("empty: give an address (127.0.0.1 for this machine, 0.0.0.0 for every interface)")
        return bare

    @field_validator("model_dir", mode="before")
    @classmethod
    def _store_path(cls, value: Any) -> Any:
        # Empty is unset (as an unset variable leaves it), not the current folder.
        if isinstance(value, str) and not value.strip():
            return default_model_dir()
        return _expand_user(value)

    @field_validator("model_mirror")
    @classmethod
    def _mirror_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # empty is unset: no mirror
        if "://" not in value:
            return str(_expand_user(value))  # a folder
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # raises on a port that is not a number
        except ValueError as e:
            raise ValueError(f"not a valid URL ({e})") from None
        if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.hostname):
            raise ValueError("a mirror URL is http://, https:// or file:// (or give a folder)")
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # LOG_LEVEL=INFO, as in Python's logging

    @field_validator("models", mode="before")
    @classmethod
    def _models_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [s.strip() for s in text.split(",") if s.strip()]
        if isinstance(value, list):
            return [model_entry(v) if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_models(self) -> "Settings":
        if not self.models:
            raise ValueError("models: at least one model must be configured")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        if self.default_model is None:
            self.default_model = names[0]
        elif self.default_model not in names:
            raise ValueError(f"default_model: {self.default_model!r} is not among the configured models {names}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls)


class _ConfigFileSource(TomlConfigSettingsSource):
    """The TOML config file, its relative paths taken from its own folder, as Prometheus and
    Compose read theirs: a config kept beside its models works from any current folder."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:  # type: ignore[override]
        return _paths_from(Path(file_path).parent, super()._read_file(file_path))


def _paths_from(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the relative paths it names (the store, a mirror folder, a model's file
    and labels file) made relative to ``folder``."""
    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value.strip() and "://" not in value and not value.startswith("~"):
            return str(folder / value) if not Path(value).is_absolute() else value
        return value

    data = dict(data)
    for key in ("model_dir", "model_mirror"):
        if key in data:
            data[key] = resolved(data[key])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {**m, **{k: resolved(m[k]) for k in ("path", "labels") if k in m}} if isinstance(m, dict) else m
            for m in data["models"]
        ]
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Builds settings from a TOML file, the environment and explicit overrides (CLI flags).

    Raises ``ConfigError`` naming each bad key.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} {'is not a file' if config_file.exists() else 'does not exist'}")

    unknown = unknown_variables(os.environ)
    if unknown:  # as an unknown key in the file, or under a nested variable, is
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {name}: names no setting" for name in unknown))

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        return _FromFile(**overrides)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, config_file)) from None
    except ValueError as e:  # TOML syntax errors and JSON in env vars
        raise ConfigError(f"invalid configuration{f' in {config_file}' if config_file else ''}: {_described(e, config_file)}") from None


def _described(e: ValueError, config_file: Path | None) -> str:
    """A TOML or environment fault in the user's terms: pydantic-settings names its own class
    ("from source EnvSettingsSource"), and tomllib does not see a byte-order mark as one."""
    env_field = re.search(r'error parsing value for field "(\w+)" from source "EnvSettingsSource"', str(e))
    if env_field:
        name = f"VISIONSERVE_{env_field.group(1).upper()}"
        return f"{name}: not a valid JSON value (a section's variable holds a JSON object, or set {name}__KEY)"
    if config_file is not None and config_file.read_bytes().startswith(b"\xef\xbb\xbf"):
        return f"{e} (the file starts with a UTF-8 byte-order mark: save it without one)"
    return str(e)


# Read by others than Settings: the CLI's --config, compose.yaml's host port.
_OTHER_VARIABLES = {"VISIONSERVE_CONFIG", "VISIONSERVE_HOST_PORT"}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``VISIONSERVE_*`` variables that name no setting (``VISIONSERVE_LOG_LEVL``).
    pydantic-settings rejects an unknown nested key but skips an unknown top-level one."""
    prefix = "VISIONSERVE_"
    return sorted(
        name for name in environ
        if name.upper().startswith(prefix) and name.upper() not in _OTHER_VARIABLES
        and name[len(prefix):].lower().split("__")[0] not in Settings.model_fields
    )


def format_validation_error(err: ValidationError, config_file: Path | None) -> str:
    where = f" ({config_file})" if config_file else ""
    lines = [f"invalid configuration{where}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)
