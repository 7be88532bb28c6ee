"""Helpers for the engine tests: concurrent uploads and reading /metrics."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx


def post_image(url: str, image: Path, headers: dict[str, str] | None = None, path: str = "/predict") -> httpx.Response:
    with httpx.Client(timeout=60) as c:
        return c.post(url + path, files={"image": (image.name, image.read_bytes(), "image/jpeg")}, headers=headers or {})


def concurrent_posts(url: str, images: list[Path], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """Posts all images at once (threads released together by a barrier)."""
    results: list[httpx.Response | None] = [None] * len(images)
    barrier = threading.Barrier(len(images))

    def send(i: int) -> None:
        body = images[i].read_bytes()
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            results[i] = c.post(url + "/predict", files={"image": (images[i].name, body, "image/jpeg")},
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
