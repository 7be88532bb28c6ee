"""How this process uses the cores: how many it may use (the cores it may run on, and no more
than its cgroup's CPU bandwidth limit allows), and its threads' scheduling policy.

``docker run --cpus=2``, Kubernetes' ``resources.limits.cpu`` and systemd's ``CPUQuota``
limit a process by CPU time (the CFS quota), not by cores: it still sees, and may run on,
every core of the host. Sized by those alone, the server on a 64-core host limited to two
CPUs started 64 worker threads, each with its own inference session, and a 64-thread
session for lone requests, and the kernel throttled them all to two CPUs' worth of time.
The limit is read as the runtimes that respect it read it (Go, the JVM, .NET): quota over
period, rounded up.
"""

from __future__ import annotations

import math
import os
import sys
from functools import cache
from pathlib import Path
from typing import Callable, Literal

from visionserve.runtime.settings import RuntimeSettings

CGROUP_ROOT = Path("/sys/fs/cgroup")


@cache
def cpu_count() -> int:
    """Cores this process may use: its affinity mask (container CPU sets included), capped
    by its cgroup's CPU limit. Read once per process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit(CGROUP_ROOT, _read(Path("/proc/self/cgroup")) or "")
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cgroup_cpu_limit(root: Path, self_cgroup: str) -> float | None:
    """The CPUs (quota / period) that the tightest CPU limit on the way from the process's
    cgroup up to the root allows; None when there is none.

    ``self_cgroup`` is ``/proc/self/cgroup``. cgroup v2 puts the limit in ``cpu.max``
    ("max 100000" for none); v1 in the cpu controller's ``cpu.cfs_quota_us`` (-1 for none)
    and ``cpu.cfs_period_us``. Inside a container the hierarchy is mounted from the
    container's own cgroup, which /proc/self/cgroup may still name by its host path: the
    mount's root then holds the container's limit, and is always read."""
    limits: list[float] = []
    for line in self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            limits += _limits(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct") if (root / name).is_dir()), None)
            if mount is not None:
                limits += _limits(mount, path, _v1_limit)
    return min(limits, default=None)


def _limits(mount: Path, path: str, read_limit: Callable[[Path], float | None]) -> list[float]:
    """The limits set on the process's cgroup and its parents, up to ``mount``."""
    folder = mount / path.strip("/")
    if not folder.is_dir():
        folder = mount  # a container's own cgroup, named by its host path
    found = []
    while True:
        limit = read_limit(folder)
        if limit is not None:
            found.append(limit)
        if folder == mount:
            return found
        folder = folder.parent


def _v2_limit(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if text is None:
        return None
    quota, _, period = text.strip().partition(" ")
    return _ratio(quota, period)


def _v1_limit(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None  # a negative quota (v1's -1) is no limit


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# sched_getscheduler() adds this flag to the policy of a thread that has it.
_RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0)
_POLICY_NAMES = {
    getattr(os, constant): name
    for constant, name in (("SCHED_OTHER", "normal"), ("SCHED_BATCH", "batch"), ("SCHED_IDLE", "idle"),
                           ("SCHED_FIFO", "fifo"), ("SCHED_RR", "rr"))
    if hasattr(os, constant)
}


def use_thread_settings(runtime: RuntimeSettings) -> None:
    """The runtime settings that hold for a whole process, for the server's processes and the
    ceiling alike: the GIL switch interval and the threads' scheduling policy."""
    # A worker thread coming back from ONNX Runtime or OpenCV waits for the GIL; with
    # Python's default 5 ms switch interval it waits up to that long behind a busy event
    # loop, many times per image. 1 ms measured far lower tail latency under load.
    sys.setswitchinterval(runtime.gil_switch_interval_ms / 1e3)
    use_cpu_policy(runtime.cpu_policy)


def use_cpu_policy(policy: Literal["batch", "normal"]) -> None:
    """Puts the threads of this process under ``policy`` (``runtime.cpu_policy``): those it
    has, and so the ones they start later, which inherit it. "batch" is Linux's SCHED_BATCH:
    when all cores are busy, a thread that wakes (the event loop on a new request, a worker
    handed a job) waits for the running one's time slice to end instead of preempting it. On
    two cores shared by the event loop and the inference workers, the loop then wakes less
    often per request and is preempted half as often (docs/benchmarks.md). "normal" changes
    nothing. Threads under another policy than the default (an operator's ``chrt``) keep it,
    as does a system that refuses the change (a seccomp profile) or has no such policy."""
    batch = getattr(os, "SCHED_BATCH", None)
    if policy != "batch" or batch is None:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]  # this thread
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) & ~_RESET_ON_FORK == os.SCHED_OTHER:
                os.sched_setscheduler(tid, batch, os.sched_param(0))
        except OSError:  # the thread ended meanwhile, or the change is refused
            pass


def cpu_policy_in_force() -> str:
    """This thread's scheduling policy, as ``runtime.cpu_policy`` names it ("normal" for
    Linux's default), for /status."""
    try:
        policy = os.sched_getscheduler(0) & ~_RESET_ON_FORK
    except (AttributeError, OSError):
        return "normal"
    return _POLICY_NAMES.get(policy, str(policy))
