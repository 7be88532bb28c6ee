"""The ``[runtime]`` section of the settings: how inference uses the cores.

Its own module, free of pydantic-settings, because the inference process needs this and
nothing else of the configuration (the settings loader would add about 17 MB to it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RuntimeSettings(BaseModel):
    """How inference uses the cores (defaults chosen by the measurements in docs/benchmarks.md).

    A lone request runs on a session with ``intra_op_threads`` threads (all cores), so one
    image gets the whole machine; when several requests wait, ``inference_workers`` of them
    run at once, each on its own core. Decode, pre- and post-processing run on the same
    worker as the inference, so one image decodes while another is in the model. Workers
    are threads of the HTTP process by default; ``worker_mode = "processes"`` runs them in
    inference processes (``inference_processes``), where the HTTP process's work never holds
    up theirs through the GIL, at the cost of a hand-off per job.
    """

    model_config = ConfigDict(extra="forbid")

    # The upper bounds are far past any machine's cores (each worker holds a session of its
    # own): they are there so that a typo such as 100000 fails with the setting's name instead
    # of a server that builds threads until memory runs out.
    intra_op_threads: int = Field(
        default=0, ge=0, le=1024, description="ONNX Runtime threads for a lone request's inference; 0 = all cores"
    )
    inter_op_threads: int = Field(default=1, ge=1, le=1024)
    inference_workers: int = Field(
        default=0, ge=0, le=256,
        description="inferences run at once when requests queue up; 0 = one per core the process may use, "
        "within its cgroup's CPU quota (docker --cpus, Kubernetes CPU limits)",
    )
    decode_threads: int = Field(default=0, ge=0, le=1024, description="threads for the HTTP process's CPU work beside inference (decoding large V2 JSON bodies); 0 = number of cores")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = Field(
        default=True,
        description="let ONNX Runtime's threads spin between operators while a run lasts (they stop when it "
        "returns); much faster for a lone request unless other busy programs share the cores",
    )
    memory_arena: bool = Field(default=True, description="ONNX Runtime's CPU memory arena (reuses buffers between runs)")
    jpeg_reduced_decode: float = Field(
        default=2.0, ge=0,
        description="large JPEGs decode at 1/2, 1/4 or 1/8 scale (libjpeg-turbo DCT scaling) while staying at "
        "least this many times the model's input size; 0 = always full size. At 2 the detections on the test "
        "images are unchanged (at 1 they move by a few pixels)",
    )
    minimal_padding: bool = Field(
        default=True,
        description="letterboxed images are padded only to a multiple of the network's largest stride "
        "(a 4:3 photo runs at 416x320, not 416x416: about a quarter faster), for families and graphs that "
        "take such sizes; off with dynamic batching, whose images must share one size",
    )
    worker_mode: Literal["processes", "threads"] = Field(
        default="threads",
        description="where inference runs: in threads of the HTTP process (measured faster at every "
        "concurrency, in 50 MB less) or in inference processes, with a GIL of their own "
        "(docs/benchmarks.md)",
    )
    inference_processes: int = Field(
        default=1, ge=0, le=256,
        description="processes hosting the inference workers (worker_mode \"processes\"), each worker a "
        "thread with its own sessions; 1 keeps the interpreter, libraries and ONNX Runtime's state once "
        "(least memory); 0 = one process per worker",
    )
    worker_timeout_s: float = Field(
        default=120.0, ge=0,
        description="a worker that has spent longer than this on one job is stuck: in worker_mode \"processes\" "
        "its process is stopped and started again and that job gets 500 (as TorchServe reboots an unresponsive "
        "worker); a thread cannot be stopped, so in \"threads\" /healthz and /readyz answer 503 until it "
        "returns, for an orchestrator to restart the server; 0 = never",
    )
    cpu_policy: Literal["batch", "normal"] = Field(
        default="batch",
        description="Linux scheduling policy of the server's threads: \"batch\" (SCHED_BATCH) lets a thread that "
        "wakes wait for the running one's time slice instead of preempting it, so the event loop wakes less "
        "often per request (2-3% more throughput under load here, a lone request about 0.05 ms slower); "
        "\"normal\" leaves the policy the server was started with. Batch threads do not preempt other "
        "programs' either: choose \"normal\" where busy programs share the cores",
    )
    gil_switch_interval_ms: float = Field(
        default=1.0, gt=0,
        description="how often Python hands the GIL between threads; short keeps workers from "
        "waiting behind a busy HTTP loop",
    )
