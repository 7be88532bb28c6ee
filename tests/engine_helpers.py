"""Helpers for the engine tests: concurrent uploads, reading /metrics, the server's processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx


def copy_model(store: Path, source: Path, name: str) -> Path:
    """An installed model's folder copied into ``store`` under another name."""
    folder = store / name
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return folder


def post_image(url: str, image: Path, headers: dict[str, str] | None = None, path: str = "/predict") -> httpx.Response:
    with httpx.Client(timeout=60) as c:
        return c.post(url + path, files={"image": (image.name, image.read_bytes(), "image/jpeg")}, headers=headers or {})


def concurrent_posts(
    url: str, images: list[Path], headers: dict[str, str] | None = None, path: str = "/predict"
) -> list[httpx.Response]:
    """Posts all images at once (threads released together by a barrier)."""
    results: list[httpx.Response | None] = [None] * len(images)
    barrier = threading.Barrier(len(images))

    def send(i: int) -> None:
        body = images[i].read_bytes()
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            results[i] = c.post(url + path, files={"image": (images[i].name, body, "image/jpeg")},
                                headers=headers or {})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        labels_text = line[line.index("{") + 1 : line.rindex("}")] if "{" in line else ""
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def multipart_upload(body: bytes, path: str = "/predict") -> tuple[bytes, bytes]:
    """(request head, body) of a raw HTTP/1.1 multipart upload of ``body`` as field "image"."""
    boundary = "b0undary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"d.jpg\"\r\n\r\n").encode() \
        + body + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    return head, payload


def connect(url: str, timeout: float = 30) -> socket.socket:
    """A raw TCP connection to the server at ``url``, for requests httpx would not send."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def start_upload(url: str, body: bytes, path: str = "/predict") -> tuple[socket.socket, bytes]:
    """Sends the headers and half the body of a multipart upload; returns the socket and the rest."""
    head, payload = multipart_upload(body, path)
    s = connect(url)
    half = len(payload) // 2
    s.sendall(head + payload[:half])
    return s, payload[half:]


def read_response(s: socket.socket) -> bytes:
    """One answer (with a Content-Length)."""
    return read_responses(s, 1)[0]


def _recv(s: socket.socket, so_far: bytes) -> bytes:
    chunk = s.recv(65536)
    if not chunk:  # else the caller would wait for more forever
        raise ConnectionError(f"connection closed by the server after {so_far[:200]!r}")
    return chunk


def read_responses(s: socket.socket, n: int) -> list[bytes]:
    """``n`` answers in a row (to pipelined requests, which may come in one read)."""
    data, answers = b"", []
    while len(answers) < n:
        head, sep, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), None) if sep else None
        if length is not None and len(rest) >= length:
            answers.append(head + sep + rest[:length])
            data = rest[length:]
            continue
        data += _recv(s, data)
    return answers


def wait_metric(url: str, name: str, value: float, **labels: str) -> None:
    """Waits (up to about 4 s) until the server's metric ``name`` reads ``value``."""
    for _ in range(200):
        if metric(httpx.get(url + "/metrics").text, name, **labels) == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {value}")


def wait_in_flight(url: str, n: int) -> None:
    wait_metric(url, "visionserve_requests_in_flight", n)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the server's inference process)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def thread_policies(pid: int) -> set[int]:
    """The scheduling policies of a process's threads (os.SCHED_*)."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def mapped_libraries(pid: int) -> str:
    """The files a process has mapped, one per line (its shared libraries among them)."""
    return "\n".join(line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line)


def read_until_closed(s: socket.socket, seconds: float) -> bytes | None:
    """All the server sends on ``s`` until it closes the connection; None when it is still
    open ``seconds`` later."""
    data, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None
