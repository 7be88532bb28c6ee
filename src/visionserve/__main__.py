"""The ``visionserve`` command (and ``python -m visionserve``), with SIGTERM and SIGINT
handled from its first instant.

In a container the command is PID 1, and the kernel drops a signal that PID 1 has no
handler for: a ``docker stop`` during the second or so of imports, or during a model pull
before the server starts, was lost, and the container killed after the grace period. Until
the server installs its own handlers (uvicorn's, which drain), a signal ends the command at
once: exit 0 for SIGTERM, 130 for SIGINT, without a traceback.
"""

import signal
import sys


def _stop(signum: int, frame: object) -> None:
    sys.exit(0 if signum == signal.SIGTERM else 128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from visionserve.cli import main as cli_main  # the imports take most of a second

    cli_main()


if __name__ == "__main__":
    main()
