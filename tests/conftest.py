"""Shared fixtures: the model mirror, a model store filled from it, and real servers on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("VISIONSERVE_MODEL_MIRROR", REPO.parent / "shared" / "models")).resolve()
IMAGES = MIRROR / "test_images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "yolox_nano").is_dir():
        pytest.fail(f"model mirror not found at {MIRROR}; set VISIONSERVE_MODEL_MIRROR")
    return MIRROR


@pytest.fixture(scope="session")
def images(mirror: Path) -> Path:
    return mirror / "test_images"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A model store shared by the whole session, with the default model pulled from the mirror."""
    from visionserve.store.store import ModelStore

    root = tmp_path_factory.mktemp("models")
    ModelStore(root, mirror=str(mirror)).pull("yolox-nano")
    return root


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_server(
    model_dir: Path,
    mirror: Path,
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool | None = True,
    timeout: float = 60,
) -> ServerProcess:
    """Starts ``visionserve serve`` on a free loopback port and waits until it is ready
    (``wait_ready`` False: until it answers /healthz; None: not at all)."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    full_env = {
        **os.environ,
        "VISIONSERVE_MODEL_DIR": str(model_dir),
        "VISIONSERVE_MODEL_MIRROR": str(mirror),
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env or {}),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "visionserve", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=full_env,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    if wait_ready is None:
        return server
    deadline = time.monotonic() + timeout
    path = "/readyz" if wait_ready else "/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + path, timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready within {timeout}s:\n{server.output()}")


@pytest.fixture(scope="session")
def server(model_dir: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the default model for the whole session."""
    srv = start_server(model_dir, mirror, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture()
def server_factory(model_dir: Path, mirror: Path, tmp_path: Path) -> Iterator:
    """Starts servers with extra CLI args / env for one test; stops them afterwards."""
    started: list[ServerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None, wait_ready: bool | None = True) -> ServerProcess:
        srv = start_server(model_dir, mirror, tmp_path, *args, env=env, wait_ready=wait_ready)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()
