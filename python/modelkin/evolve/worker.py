"""A local worker process (``python -m modelkin.evolve.worker ADDRESS``): connects back to the
driver's pool, receives the evaluator, then runs jobs until told to stop."""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import threading
import time
from multiprocessing.connection import Client

from ..io.signals import interrupts_as_ctrl_c
from .evaluator_registry import make_evaluator
from .executors import EVALUATING, run_job


def _exit_with_parent(parent: int) -> None:
    """A driver killed with SIGKILL cannot stop its workers: they stop themselves when orphaned,
    instead of finishing an evaluation nobody will record."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def main() -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    text = sys.argv[1]
    address = ast.literal_eval(text) if text.startswith("(") else text
    conn = Client(address, authkey=bytes.fromhex(os.environ.pop("MODELKIN_WORKER_KEY")))
    conn.send(os.getpid())
    spec, override = conn.recv()
    evaluate = make_evaluator(spec, override)
    # SIGTERM/SIGHUP (the driver closing the pool, or the whole process group stopped) unwind a job
    # as Ctrl-C does: its merge's temporary directory and scratch model are removed.
    with interrupts_as_ctrl_c(), contextlib.suppress(KeyboardInterrupt):  # quietly: the driver says why
        while True:
            job = conn.recv()
            if job is None:
                return
            conn.send(run_job(job, evaluate, spec.resident, lambda: conn.send(EVALUATING)))


if __name__ == "__main__":
    main()
