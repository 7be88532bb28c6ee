"""The cores the server sizes itself by: its cgroup's CPU limit, read from cgroup trees laid
out as the kernel lays them out (runtime/cpus.py). The container smoke test (.ci/container-smoke)
runs the image with ``--cpus=1`` and checks the workers it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionserve.runtime.cpus import cgroup_cpu_limit

REPO = Path(__file__).resolve().parents[1]


def _write(root: Path, folder: str, **files: str) -> None:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_inside_a_container_reads_the_limit_at_the_root(tmp_path):
    _write(tmp_path, "", cpu_max="150000 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") == 1.5


def test_v2_on_a_host_takes_the_tightest_limit_up_to_the_root(tmp_path):
    _write(tmp_path, "system.slice", cpu_max="200000 100000")  # systemd CPUQuota=200%
    _write(tmp_path, "system.slice/visionserve.service", cpu_max="max 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/system.slice/visionserve.service\n") == 2.0
    _write(tmp_path, "system.slice/visionserve.service", cpu_max="50000 100000")
    assert cgroup_cpu_limit(tmp_path, "0::/system.slice/visionserve.service\n") == 0.5


def test_no_limit(tmp_path):
    _write(tmp_path, "", cpu_max="max 100000")
    _write(tmp_path, "user.slice")
    assert cgroup_cpu_limit(tmp_path, "0::/user.slice\n") is None
    assert cgroup_cpu_limit(tmp_path, "") is None


def test_v1_inside_a_container_whose_cgroup_is_named_by_its_host_path(tmp_path):
    """Docker and Podman on cgroup v1 mount the container's own cgroup at
    /sys/fs/cgroup/cpu, while /proc/self/cgroup names it by its host path (as here, from
    ``podman run --cpus=1`` on this machine)."""
    _write(tmp_path, "cpu", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    self_cgroup = "4:memory:/libpod_parent/libpod-56b0\n1:cpu:/libpod_parent/libpod-56b0\n0::/libpod_parent/libpod-56b0\n"
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == 1.0


def test_v1_with_joined_controllers_on_a_host(tmp_path):
    _write(tmp_path, "cpu,cpuacct", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    _write(tmp_path, "cpu,cpuacct/batch", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    assert cgroup_cpu_limit(tmp_path, "3:cpu,cpuacct:/batch\n") == 3.0
    assert cgroup_cpu_limit(tmp_path, "3:cpu,cpuacct:/\n") is None  # -1: no limit


def test_unreadable_or_malformed_files_are_no_limit(tmp_path):
    _write(tmp_path, "", cpu_max="garbage")
    _write(tmp_path, "cpu", cpu_cfs_quota_us="", cpu_cfs_period_us="0")
    assert cgroup_cpu_limit(tmp_path, "1:cpu:/\n0::/\n") is None


_POLICY_SCRIPT = """
import json, os, threading
import sys
from visionserve.runtime.cpus import cpu_policy_in_force, use_thread_settings
from visionserve.runtime.settings import RuntimeSettings

started, done = threading.Event(), threading.Event()
tids = {}

def thread(name, policy=None):
    try:
        if policy is not None:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        tids[name] = threading.get_native_id()
    finally:
        started.set()
    done.wait(60)

before = threading.Thread(target=thread, args=("before",))
idle = threading.Thread(target=thread, args=("idle", os.SCHED_IDLE))
for t in (before, idle):
    started.clear(); t.start(); started.wait()
use_thread_settings(RuntimeSettings(cpu_policy=os.environ["POLICY"], gil_switch_interval_ms=2.5))
started.clear()
after = threading.Thread(target=thread, args=("after",)); after.start(); started.wait()
policies = {name: os.sched_getscheduler(tid) for name, tid in tids.items()}
policies["main"] = os.sched_getscheduler(0)
print(json.dumps({"policies": policies, "in_force": cpu_policy_in_force(), "switch_s": sys.getswitchinterval()}))
done.set()
"""


@pytest.mark.parametrize("policy", ["batch", "normal"])
def test_the_thread_settings_reach_every_thread_but_one_an_operator_set(policy):
    out = subprocess.run([sys.executable, "-c", _POLICY_SCRIPT], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "POLICY": policy, "PYTHONPATH": str(REPO / "src")}, check=True).stdout
    result = json.loads(out)
    expected = os.SCHED_BATCH if policy == "batch" else os.sched_getscheduler(0)  # "normal": as started
    # Threads started before and after the call alike; one under SCHED_IDLE keeps it.
    assert result["policies"] == {"main": expected, "before": expected, "after": expected, "idle": os.SCHED_IDLE}
    assert result["in_force"] == ("batch" if expected == os.SCHED_BATCH else "normal")
    assert result["switch_s"] == pytest.approx(0.0025)  # the GIL switch interval, set with it
