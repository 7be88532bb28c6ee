#!/usr/bin/env python3
"""The benchmark suite in one command: in-process ceiling, then the server under wrk load.

    python bench/run.py                 # full run: concurrency 1, 4, 16, 64, 10 s each
    python bench/run.py --smoke         # CI: 2 s per level, checks it all works, not the targets
    python bench/run.py --storm         # refused clients re-send at once (a refusal storm)
    python bench/run.py --rounds 3      # ceiling and levels 3 times, interleaved; targets on medians
    VISIONSERVE_QUEUE__MAX_QUEUE=14 python bench/run.py   # server settings come from the environment

Steps: measures the in-process ceiling (``bench/ceiling.py --json``, same decode and
pre/post-processing, no HTTP), starts ``visionserve serve`` on a free loopback port,
records how long it takes to be ready, drives it with wrk (one thread per connection,
bench/post.lua: multipart uploads, latency of accepted requests kept apart from 503s; a
refused connection waits the Retry-After it was sent, unless ``--storm``) at each
concurrency, samples the memory of the server's processes (summed RSS and summed PSS), and
prints one table plus the targets of issue 6. With ``--rounds N`` the ceiling and the levels
are measured N times, one after the other (ceiling, levels, ceiling, levels, ...), so load
from other programs on a shared machine hits both alike, and each target is judged on the
median of its per-round figures. Everything it starts, it stops. ``--json FILE`` writes the
raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MIRROR = Path(os.environ.get("VISIONSERVE_MODEL_MIRROR", REPO.parent / "shared" / "models")).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install -y wrk) ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
    path = shutil.which("wrk")
    if not path:
        sys.exit("wrk is needed: apt-get install wrk")
    return path


def machine() -> dict[str, object]:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_avg_at_start": os.getloadavg(),
    }


def ceiling(env: dict[str, str], image: Path, seconds: float) -> dict | None:
    """Runs bench/ceiling.py --json (the in-process ceiling) on ``image`` for ``seconds`` per
    measurement; None if it is missing or fails."""
    script = BENCH / "ceiling.py"
    if not script.is_file():
        print("bench/ceiling.py not found: no ceiling, ratios left out", file=sys.stderr)
        return None
    cmd = [sys.executable, str(script), "--json", "--image", str(image), "--seconds", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        print(f"ceiling.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def ceiling_figures(ceil: dict | None) -> tuple[float | None, float | None]:
    """(throughput images/s with N single-threaded workers, single-image p50 ms on all cores)
    from bench/ceiling.py's JSON: {"single": {"ms_p50", ...}, "throughput": {"images_per_s", ...}}."""
    if not ceil:
        return None, None
    return float(ceil["throughput"]["images_per_s"]), float(ceil["single"]["ms_p50"])


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (the server and its inference workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except OSError:
            continue
    return out


def thread_counters(pid: int) -> dict[str, tuple[float, float]]:
    """What the server's threads have done so far, each as (its event-loop thread, everything
    else: worker threads, pools and any inference processes): CPU time (user + system,
    seconds), times a thread went to sleep (voluntary context switches: the loop waiting for
    work) and times it was preempted (involuntary ones)."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = {"cpu_s": [0.0, 0.0], "sleeps": [0.0, 0.0], "preempted": [0.0, 0.0]}
    for p in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
            except (OSError, ValueError):
                continue  # the thread ended
            # The HTTP process's main thread (its id is the process's) runs the event loop.
            side = 0 if task.name == str(pid) else 1
            totals["cpu_s"][side] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            totals["sleeps"][side] += int(status["voluntary_ctxt_switches"])
            totals["preempted"][side] += int(status["nonvoluntary_ctxt_switches"])
    return {k: (v[0], v[1]) for k, v in totals.items()}


def children_cpu_seconds() -> float:
    """CPU time of this script's finished children (the load generator, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory_mb(pid: int) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) over the process tree, MB. RSS counts the pages forked workers
    share with the server once per process; PSS divides each shared page among its sharers,
    so the PSS sum is the memory the tree really occupies."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


class Server:
    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="visionserve-bench-", suffix=".log", delete=False)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visionserve", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self.ready_s = self._wait_ready(t0)
        self.peak_rss, self.peak_pss = memory_mb(self.proc.pid)
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _wait_ready(self, t0: float) -> float:
        with httpx.Client(timeout=1) as c:
            while time.monotonic() - t0 < 60:
                if self.proc.poll() is not None:
                    sys.exit(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
                try:
                    if c.get(self.url + "/readyz").status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        self.stop()
        sys.exit("server not ready within 60 s")

    def _sample(self) -> None:
        while self._sampling:
            rss, pss = memory_mb(self.proc.pid)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(0.2)

    def stop(self) -> int | None:
        self._sampling = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def drive(wrk: str, url: str, server_pid: int, image: Path, concurrency: int, seconds: float,
          storm: bool = False) -> dict:
    """wrk at ``concurrency`` connections: a refused connection waits the server's Retry-After
    before its next request, or (``storm``) re-sends at once. Also the CPU time that the
    server's event loop, the rest of the server, and wrk spent per answer."""
    env = {**os.environ, "BENCH_IMAGE": str(image), "BENCH_PATH": "/predict", "BENCH_STORM": "1" if storm else "0"}
    cmd = [wrk, f"-t{concurrency}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(BENCH / "post.lua"), url]
    before, wrk0 = thread_counters(server_pid), children_cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60).stdout
    after, wrk_cpu = thread_counters(server_pid), children_cpu_seconds() - wrk0
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        sys.exit(f"wrk gave no result:\n{out}")
    r = json.loads(line.removeprefix("BENCH_JSON "))
    r["concurrency"] = concurrency
    r["ok_per_s"] = r["ok"] / r["duration_s"]
    refused = r["other_status"].get("503", 0)
    r["refused_503"] = refused
    r["errors"] = sum(v for k, v in r["other_status"].items() if k != "503") + sum(r["socket_errors"].values())
    if r["ok"]:
        # Per answered request; refusals (cheap, but not free) are spread over the answers.
        per_ok = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
        r["cpu_ms_per_ok"] = {
            "event_loop": per_ok["cpu_s"][0] * 1e3 / r["ok"],
            "workers": per_ok["cpu_s"][1] * 1e3 / r["ok"],
            "load_generator": wrk_cpu * 1e3 / r["ok"],
        }
        # How often the threads were switched out: every wake-up of the loop runs its code
        # with cold caches, and every preemption of a worker costs it its caches.
        r["switches_per_ok"] = {
            "event_loop_sleeps": per_ok["sleeps"][0] / r["ok"],
            "event_loop_preempted": per_ok["preempted"][0] / r["ok"],
            "workers_preempted": per_ok["preempted"][1] / r["ok"],
        }
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="short run (2 s per level) that only checks it all works")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each level (and of each of the "
                    "ceiling's two measurements)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the ceiling and the levels this many times, interleaved; targets on the medians")
    ap.add_argument("--image", type=Path, default=MIRROR / "test_images" / "dog.jpg")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the in-process ceiling")
    ap.add_argument("--storm", action="store_true",
                    help="refused clients re-send at once instead of waiting the Retry-After the server sent")
    ap.add_argument("--json", type=Path, help="write all figures here")
    ap.add_argument("server_args", nargs="*", help="extra arguments for visionserve serve (after --)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    seconds = 2.0 if args.smoke else args.seconds
    levels = [int(x) for x in args.levels.split(",")]

    wrk = ensure_wrk()
    model_dir = os.environ.get("VISIONSERVE_MODEL_DIR") or tempfile.mkdtemp(prefix="visionserve-bench-models-")
    env = {
        **os.environ,
        "VISIONSERVE_MODEL_DIR": model_dir,
        "VISIONSERVE_MODEL_MIRROR": os.environ.get("VISIONSERVE_MODEL_MIRROR", str(MIRROR)),
        "VISIONSERVE_ACCESS_LOG": "false",
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    sys.path.insert(0, str(REPO / "src"))
    from visionserve.store.store import ModelStore

    ModelStore(Path(model_dir), mirror=env["VISIONSERVE_MODEL_MIRROR"]).ensure("yolox-nano")

    report: dict = {"machine": machine(), "image": args.image.name, "seconds_per_level": seconds,
                    "clients": "storm" if args.storm else "retry-after",
                    "settings": {k: v for k, v in os.environ.items() if k.startswith("VISIONSERVE_") and k not in
                                 ("VISIONSERVE_MODEL_DIR", "VISIONSERVE_MODEL_MIRROR")},
                    "rounds": []}

    def measure_ceiling() -> dict | None:
        return None if args.no_ceiling else ceiling(env, args.image, seconds)

    # The first ceiling runs before the server starts, so the start-up is timed on a quiet
    # machine; later rounds measure it beside the server, idle between the levels.
    first_ceiling = measure_ceiling()
    server = Server(env, args.server_args)
    report["ready_s"] = server.ready_s
    try:
        with httpx.Client() as c:  # one request to check the answer before timing anything
            r = c.post(server.url + "/predict", files={"image": (args.image.name, args.image.read_bytes(), "image/jpeg")})
            r.raise_for_status()
        for i in range(args.rounds):
            ceil = first_ceiling if i == 0 else measure_ceiling()
            measured = [drive(wrk, server.url, server.proc.pid, args.image, c, seconds, args.storm) for c in levels]
            report["rounds"].append({"ceiling": ceil, "levels": measured})
    finally:
        report["peak_rss_mb"] = server.peak_rss
        report["peak_pss_mb"] = server.peak_pss
        report["processes"] = len(process_tree(server.proc.pid))
        report["exit_code"] = server.stop()
    if not report["rounds"]:
        sys.exit(f"benchmark failed before its first round; exit code {report['exit_code']}")
    # The middle round stands for the run where one round's figures are wanted: the "ceiling"
    # and "levels" keys, the CPU tables.
    middle, basis = median_round(report["rounds"])
    report["median_round"], report["median_round_by"] = report["rounds"].index(middle) + 1, basis
    report["ceiling"], report["levels"] = middle["ceiling"], middle["levels"]
    report["targets"] = targets(report)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    bad = [lv for rnd in report["rounds"] for lv in rnd["levels"] if lv["errors"] or lv["ok"] == 0]
    if bad or report["exit_code"] != 0:
        sys.exit(f"benchmark errors: {bad or ''} exit code {report['exit_code']}")


def level_at(rnd: dict, concurrency: int) -> dict | None:
    """A round's figures at ``concurrency``, if it ran that level."""
    return next((lv for lv in rnd["levels"] if lv["concurrency"] == concurrency), None)


def round_ratio(rnd: dict, concurrency: int) -> float | None:
    """A round's throughput at ``concurrency`` as a fraction of its own ceiling."""
    ceil_ips, _ = ceiling_figures(rnd["ceiling"])
    level = level_at(rnd, concurrency)
    return level["ok_per_s"] / ceil_ips if ceil_ips and level else None


def median_round(rounds: list[dict]) -> tuple[dict, str]:
    """The middle round, and what it is the middle of: the rounds' c=16 ratios to their
    ceilings where they have both, else their first levels' throughputs."""
    if all(round_ratio(rnd, 16) is not None for rnd in rounds):
        key, basis = (lambda rnd: round_ratio(rnd, 16)), "its c=16 ratio"
    else:
        key, basis = (lambda rnd: rnd["levels"][0]["ok_per_s"]), f"its c={rounds[0]['levels'][0]['concurrency']} ok/s"
    ordered = sorted(rounds, key=key)
    return ordered[(len(ordered) - 1) // 2], basis


def targets(rep: dict) -> dict[str, dict]:
    """Issue 6's benchmark targets, each with its figure per round and the median of those
    (``met`` judged on the median): every round's ratio comes from its own ceiling."""
    out: dict[str, dict] = {}

    def add(name: str, per_round: list[float], bound: float, higher_is_better: bool = False) -> None:
        if per_round:
            mid = statistics.median(per_round)
            met = mid >= bound if higher_is_better else mid <= bound
            out[name] = {"per_round": per_round, "median": mid, "bound": bound, "met": met}

    rounds = rep["rounds"]
    add("c16_vs_ceiling", [r for r in (round_ratio(rnd, 16) for rnd in rounds) if r is not None], 0.95, True)
    over_single = []  # c=1 p50 minus the same round's single-image p50, ms
    for rnd in rounds:
        single_ms = ceiling_figures(rnd["ceiling"])[1]
        c1 = level_at(rnd, 1)
        if single_ms and c1:
            over_single.append(c1["p50_ms"] - single_ms)
    add("c1_p50_over_single_ms", over_single, 1.0)
    c64_over_c1 = []  # c=64 p99 as a multiple of the same round's c=1 p50
    for rnd in rounds:
        c1, c64 = level_at(rnd, 1), level_at(rnd, 64)
        if c1 and c64 and c1["p50_ms"] > 0:
            c64_over_c1.append(c64["p99_ms"] / c1["p50_ms"])
    add("c64_p99_over_c1_p50", c64_over_c1, 4.0)
    add("ready_s", [rep["ready_s"]], 1.0)
    add("rss_mb", [rep["peak_rss_mb"]], 250.0)
    return out


def print_report(rep: dict) -> None:
    m = rep["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']}, load {m['load_avg_at_start']}")
    print(f"server ready {rep['ready_s']:.2f} s after start; {rep.get('processes', '?')} processes, peak RSS sum "
          f"{rep['peak_rss_mb']:.0f} MB, peak PSS sum {rep.get('peak_pss_mb', 0):.0f} MB; exit code {rep['exit_code']}")
    clients = ("refused clients re-send at once (storm)" if rep.get("clients") == "storm"
               else "refused clients wait the Retry-After they were sent")
    print(f"load: wrk, one connection per thread, {rep['seconds_per_level']:.0f} s per level; {clients}; "
          f"server settings: {' '.join(f'{k}={v}' for k, v in rep.get('settings', {}).items()) or 'defaults'}")
    rounds = rep["rounds"]
    for i, rnd in enumerate(rounds, 1):
        ceil = rnd["ceiling"]
        ceil_ips, ceil_ms = ceiling_figures(ceil)
        workers = ceil["throughput"].get("workers") if ceil else None
        policy = ceil.get("cpu_policy") if ceil else None
        throughput = ceil_ips and f"{ceil_ips:.1f} images/s ({workers} processes, {policy} CPU policy)"
        label = f"round {i} of {len(rounds)}: " if len(rounds) > 1 else ""
        print(f"\n{label}in-process ceiling: {throughput}, single image (all cores) p50 {ceil_ms and f'{ceil_ms:.2f} ms'}")
        print(f"{'conc':>5} {'ok/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'503/s':>8} {'errors':>6} {'vs ceiling':>10}")
        for lv in rnd["levels"]:
            ratio = f"{lv['ok_per_s'] / ceil_ips:.0%}" if ceil_ips else "n/a"
            print(f"{lv['concurrency']:>5} {lv['ok_per_s']:>8.1f} {lv['p50_ms']:>8.1f} {lv['p90_ms']:>8.1f} "
                  f"{lv['p99_ms']:>8.1f} {lv['refused_503'] / lv['duration_s']:>8.1f} {lv['errors']:>6} {ratio:>10}")
    ceil = rep["ceiling"]
    if len(rounds) > 1:
        print(f"\nThe CPU figures below are round {rep['median_round']}'s, the middle one by {rep['median_round_by']}.")
    print_cpu(rep, ceiling_figures(ceil)[0], ceil["throughput"].get("workers") if ceil else None)
    print_targets(rep["targets"], len(rounds))


def print_targets(found: dict[str, dict], rounds: int) -> None:
    def each(t: dict, fmt: str) -> str:
        text = fmt.format(t["median"])
        if len(t["per_round"]) > 1:
            text += f" (median; rounds: {', '.join(fmt.format(v) for v in t['per_round'])})"
        return f"{text}: {'met' if t['met'] else 'NOT met'}"

    print(f"\ntargets (issue 6){f', medians of {rounds} rounds' if rounds > 1 else ''}:")
    if "c16_vs_ceiling" in found:
        print(f"  c=16 throughput >= 95% of ceiling: {each(found['c16_vs_ceiling'], '{:.1%}')}")
    if "c1_p50_over_single_ms" in found:
        print(f"  c=1 p50 <= single-image ceiling + 1 ms: {each(found['c1_p50_over_single_ms'], '{:+.2f} ms')}")
    if "c64_p99_over_c1_p50" in found:
        print(f"  c=64 p99 of accepted <= 4x c=1 p50: {each(found['c64_p99_over_c1_p50'], '{:.2f}x')}")
    print(f"  ready within 1 s: {each(found['ready_s'], '{:.2f} s')}")
    print(f"  RSS of all processes under 250 MB: {each(found['rss_mb'], '{:.0f} MB')} (summed RSS)")


def print_cpu(rep: dict, ceil_ips: float | None, workers: int | None) -> None:
    """Where the cores went, per answered request: what serving costs on top of the model
    (``ceil_ips`` images/s from ``workers`` processes: the ceiling's CPU per image)."""
    levels = [lv for lv in rep["levels"] if "cpu_ms_per_ok" in lv]
    if not levels:
        return
    per_image = f"{workers * 1e3 / ceil_ips:.2f} ms" if ceil_ips and workers else "n/a"
    print(f"\nCPU per answered request, ms (the ceiling's workers: {per_image} per image, "
          f"{rep['machine']['cores']} cores = {rep['machine']['cores'] * 1e3:.0f} ms per second):")
    print(f"{'conc':>5} {'event loop':>11} {'workers':>8} {'wrk':>6} {'total':>7}")
    for lv in levels:
        cpu = lv["cpu_ms_per_ok"]
        total = sum(cpu.values())
        print(f"{lv['concurrency']:>5} {cpu['event_loop']:>11.2f} {cpu['workers']:>8.2f} "
              f"{cpu['load_generator']:>6.2f} {total:>7.2f}")
    print("\nThread switches per answered request (the event loop going to sleep, and being preempted; "
          "the workers being preempted):")
    print(f"{'conc':>5} {'loop sleeps':>12} {'loop preempted':>15} {'workers preempted':>18}")
    for lv in levels:
        sw = lv["switches_per_ok"]
        print(f"{lv['concurrency']:>5} {sw['event_loop_sleeps']:>12.2f} {sw['event_loop_preempted']:>15.2f} "
              f"{sw['workers_preempted']:>18.2f}")


if __name__ == "__main__":
    main()
