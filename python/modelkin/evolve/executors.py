"""Where merges and evaluations run: in the driver's process (one worker), in a pool of local
worker processes (``--workers N``), or as Ray tasks on a cluster (``--ray ADDRESS``).

A job is one candidate and one split: merge its recipe when its model is not there yet, evaluate,
return the scores. Workers never touch the run store; the driver records what comes back. Workers
that finish early take the next job. A worker that dies mid-job (its process killed) has the job
retried once on another worker, then the job fails: nothing already finished is lost.

Models reach workers by reference: local paths must be visible to every worker (one machine, or a
shared filesystem) and Hub ids are resolved by each worker from its own cache."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any, Protocol

from ..io.adapter import is_adapter
from ..io.resident import AdaptedModel, StoredModel
from .errors import RunError
from .evaluator_config import EvaluatorSpec
from .evaluator_registry import make_evaluator
from .evaluators import EvaluatorFn, ModelInput, ObjectiveError, SplitNotScored
from .faults import WORKER_LOSS_RETRIES, machine_fault

# Environment variables that size the BLAS and OpenMP thread pools of a worker process.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Job:
    """One evaluation: ``model`` is made from ``recipe`` first when it does not exist; ``scratch``
    models are deleted after the evaluation (CMA-ES candidates: re-made from their recipe if needed)."""

    candidate: int
    split: str
    model: str
    recipe: dict[str, Any] | None = None
    scratch: bool = False
    seed: int = 0
    threads: int = 0
    # The run's base: what an adapter in the pool is applied to.
    base: str | None = None


@dataclass(frozen=True)
class JobResult:
    """What a worker sends back: scores, or the error that failed the candidate."""

    candidate: int
    split: str
    scores: dict[str, float] | None
    error: str | None
    merge_s: float | None
    eval_s: float
    worker: str = ""
    # A fault of the machine (full disk, lost worker, ...): not the candidate's, which stays pending.
    fault: str | None = None
    # Why the evaluator cannot score this split (scores is None): the split stays absent.
    unscored: str | None = None
    # The error is the config's (ObjectiveError), the same for every candidate: the run stops.
    fatal: bool = False


class Executor(Protocol):
    """Runs jobs, yielding each result as soon as it is ready (in any order)."""

    workers: int
    # Worker processes replaced (lost, or killed on a timeout): shown in the run's report.
    restarts: int

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]: ...

    def close(self) -> None: ...


def run_job(
    job: Job, evaluate: EvaluatorFn, resident: bool = False, evaluating: Callable[[], object] | None = None
) -> JobResult:
    """Merges (if needed) and evaluates one job; every failure becomes the result's error, or its
    fault when the machine is to blame. ``evaluating`` is told when the evaluation starts (a pool
    times the evaluation from then, not the merge).

    A ``resident`` evaluator is handed the model in memory: a candidate merged here is merged in
    memory and evaluated from there (a scratch candidate never touches the disk; a kept one is
    written before it is evaluated, as the driver and later merges read it), and a model already on
    disk is mapped from its files."""
    from ..merge.merging import merge

    where = f"{socket.gethostname()}:{os.getpid()}"
    merge_s = None
    applied: str | None = None
    start = time.perf_counter()
    try:
        model: ModelInput = job.model
        if job.recipe is not None and not Path(job.model).exists():
            if job.recipe.get("out_format") == "adapter":
                # A candidate written as a LoRA adapter (kilobytes), evaluated as one below.
                merge(job.recipe, job.model, overwrite=True, seed=job.seed, threads=job.threads)
            elif resident:
                merged = merge(job.recipe, seed=job.seed, threads=job.threads)
                if not job.scratch:
                    merged.save(job.model, overwrite=True)
                model = merged
            else:
                merge(job.recipe, job.model, overwrite=True, seed=job.seed, threads=job.threads)
            merge_s = time.perf_counter() - start
        if isinstance(model, str) and is_adapter(model):
            # A LoRA adapter (of the pool, or a candidate written as one): evaluated as its base with
            # the adapter applied, in memory, or (for an evaluator that takes paths) written to a
            # temporary directory first.
            adapted = AdaptedModel(model, job.base)
            if resident:
                model = adapted
            else:
                applied = tempfile.mkdtemp(prefix="modelkin-adapter-")
                model = str(adapted.save(Path(applied) / "model"))
        elif resident and isinstance(model, str):
            model = StoredModel(model)
        if evaluating is not None:
            evaluating()
        start = time.perf_counter()
        raw = evaluate(model, job.split)
        if raw is None:  # a bare callable (the evaluators of evaluators.py raise SplitNotScored)
            raise SplitNotScored(f"the evaluator has no {job.split} split")
        scores = dict(raw)
        return JobResult(job.candidate, job.split, scores, None, merge_s, time.perf_counter() - start, where)
    except SplitNotScored as error:
        return JobResult(
            job.candidate, job.split, None, None, merge_s, time.perf_counter() - start, where, unscored=str(error)
        )
    except ObjectiveError as error:
        return JobResult(job.candidate, job.split, None, str(error), merge_s, 0.0, where, fatal=True)
    except Exception as error:  # the candidate fails (or the machine did), the worker goes on
        # A private class (the merge's _Reported) is named by its public base: OSError, not _Reported.
        name = next(c.__name__ for c in type(error).__mro__ if not c.__name__.startswith("_"))
        message = f"{name}: {error}"
        fault = machine_fault(error)
        return JobResult(job.candidate, job.split, None, message, merge_s, 0.0, where, fault)
    finally:
        if job.scratch:
            shutil.rmtree(job.model, ignore_errors=True)
        if applied is not None:
            shutil.rmtree(applied, ignore_errors=True)


class SerialExecutor:
    """One worker: the driver's own process (any evaluator callable works, nothing is pickled)."""

    workers = 1
    restarts = 0

    def __init__(self, evaluate: EvaluatorFn, resident: bool = False) -> None:
        self.evaluate = evaluate
        self.resident = resident

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        for job in jobs:
            yield run_job(job, self.evaluate, self.resident)

    def close(self) -> None:
        pass


# What a worker sends when a job's merge is done and its evaluation starts.
EVALUATING = "evaluating"


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection
    job: Job | None = None
    # When the job's evaluation must be over (None: no timeout, or still merging).
    deadline: float | None = None


class LocalPoolExecutor:
    """``workers`` worker processes on this machine (``python -m modelkin.evolve.worker``), each
    sized to its share of the cores. Plain subprocesses rather than multiprocessing's spawn, which
    re-imports the caller's main module: a driver started from a notebook or stdin works too."""

    def __init__(self, workers: int, spec: EvaluatorSpec, override: EvaluatorFn | None) -> None:
        self.workers = workers
        self.spec = spec
        self.override = override
        # In-process evaluators (python, lm_eval) are timed here: a worker past the timeout is
        # killed and replaced. Command evaluators time their own subprocess.
        self.timeout = spec.timeout if spec.kind != "command" else None
        self.restarts = 0
        self.pool: list[_Worker] = []
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.authkey = secrets.token_bytes(16)
        self.listener = Listener(authkey=self.authkey)

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # BLAS sizes its thread pool when numpy loads: set before the process starts.
        env.update(dict.fromkeys(_THREAD_VARS, str(self.threads)))
        # A callable evaluator travels by reference: the worker imports it from the driver's path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
        env["MODELKIN_WORKER_KEY"] = self.authkey.hex()
        address = self.listener.address
        return subprocess.Popen(
            [sys.executable, "-m", "modelkin.evolve.worker", str(address)], env=env, stdin=subprocess.DEVNULL
        )

    def _spawn(self, count: int) -> None:
        """Starts ``count`` workers at once (each takes a moment to import), then connects them."""
        processes = {p.pid: p for p in (self._start() for _ in range(count))}
        for _ in range(count):
            conn = self.listener.accept()
            pid = conn.recv()  # connections arrive in any order: each worker says which it is
            conn.send((self.spec, self.override))
            self.pool.append(_Worker(processes.pop(pid), conn))

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        pending = deque(jobs)
        attempts: dict[tuple[int, str], int] = {}
        self._spawn(max(0, min(self.workers, len(pending)) - len(self.pool)))
        while pending or any(w.job is not None for w in self.pool):
            self._assign(pending, attempts)
            busy = [w for w in self.pool if w.job is not None]
            deadlines = [w.deadline for w in busy if w.deadline is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = wait([w.conn for w in busy], timeout=wait_s)
            results = []
            for worker in busy:
                job = worker.job
                assert job is not None
                if worker.conn not in ready:
                    if worker.deadline is not None and time.monotonic() >= worker.deadline:
                        results.append(self._timed_out(worker, job))
                    continue
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    # The worker died mid-job (killed, out of memory): the machine's fault, not the
                    # candidate's. Replace it and retry the job elsewhere, a bounded number of times.
                    worker.job, worker.deadline = None, None
                    worker.process.wait()
                    self.pool.remove(worker)
                    self.restarts += 1
                    self._spawn(1)
                    if attempts[(job.candidate, job.split)] <= WORKER_LOSS_RETRIES:
                        pending.appendleft(job)
                    else:
                        lost = f"worker process lost {attempts[(job.candidate, job.split)]} times during this job"
                        results.append(JobResult(job.candidate, job.split, None, lost, None, 0.0, fault=lost))
                    continue
                if message == EVALUATING:
                    if self.timeout is not None:
                        worker.deadline = time.monotonic() + self.timeout
                    continue
                assert isinstance(message, JobResult)
                worker.job, worker.deadline = None, None
                results.append(message)
            # Freed workers take their next job before the driver records these results.
            self._assign(pending, attempts)
            yield from results

    def _timed_out(self, worker: _Worker, job: Job) -> JobResult:
        """Kills a worker whose evaluation ran past the timeout and starts another in its place;
        the candidate fails with reason timeout (its own fault: it did not finish)."""
        worker.process.kill()
        worker.process.wait()
        worker.conn.close()
        self.pool.remove(worker)
        self.restarts += 1
        self._spawn(1)
        if job.scratch:
            shutil.rmtree(job.model, ignore_errors=True)
        error = f"timeout: evaluator timed out after {self.timeout:g} s (its worker was killed and restarted)"
        return JobResult(job.candidate, job.split, None, error, None, float(self.timeout or 0.0))

    def _assign(self, pending: deque[Job], attempts: dict[tuple[int, str], int]) -> None:
        for worker in self.pool:
            if worker.job is None and pending:
                worker.job = pending.popleft()
                key = (worker.job.candidate, worker.job.split)
                attempts[key] = attempts.get(key, 0) + 1
                worker.conn.send(worker.job)

    def close(self) -> None:
        for worker in self.pool:
            if worker.job is not None:
                # Busy (the driver is stopping mid-generation): SIGTERM unwinds its job cleanly.
                worker.process.terminate()
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self.pool:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.pool = []
        self.listener.close()


def _probe(address: str) -> None:
    """Fails fast on a host:port nobody listens on (ray.init retries such an address for minutes)."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # auto, local: ray.init answers those at once
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise RunError(f"--ray {address}: cannot reach a Ray cluster ({error.strerror or error})") from error


# The evaluators of this Ray worker process, by configuration: Ray runs many tasks in one worker
# process, and a resident evaluator keeps its model between them.
_RAY_EVALUATORS: dict[str, EvaluatorFn] = {}


def _ray_job(job: Job, spec: EvaluatorSpec, override: EvaluatorFn | None) -> JobResult:
    key = repr((spec, override))
    if key not in _RAY_EVALUATORS:
        _RAY_EVALUATORS.clear()  # one at a time: a resident evaluator holds a whole model
        _RAY_EVALUATORS[key] = make_evaluator(spec, override)
    return run_job(job, _RAY_EVALUATORS[key], spec.resident)


def _ray_visible(paths: list[str]) -> tuple[str, list[str]]:
    return socket.gethostname(), [p for p in paths if not Path(p).exists()]


class RayExecutor:
    """Jobs as Ray tasks (one CPU each) on a running cluster; Ray retries a task once when its
    worker process dies. ``ray`` is imported only here (``pip install 'modelkin[ray]'``)."""

    def __init__(self, address: str, spec: EvaluatorSpec, override: EvaluatorFn | None, workers: int) -> None:
        try:
            import ray
        except ImportError as error:
            raise RunError("--ray needs Ray: pip install 'modelkin[ray]'") from error
        self.ray: Any = ray  # untyped library: its calls are checked by the tests
        _probe(address)
        try:
            if address == "local":
                ray.init(
                    num_cpus=workers or None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    ignore_reinit_error=True,
                )
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
        except Exception as error:  # ConnectionError, RuntimeError, ValueError, depending on the failure
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RunError(f"--ray {address}: cannot reach a Ray cluster ({first})") from error
        self.workers = int(self.ray.cluster_resources().get("CPU", 1))
        self.restarts = 0  # Ray restarts its own workers; a task lost twice stops the run
        self.spec = spec
        self.override = override
        self.remote = ray.remote(num_cpus=1, max_retries=1)(_ray_job)

    def check_paths(self, paths: Sequence[str]) -> None:
        """Refuses local paths that some node of the cluster cannot see."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        check = self.ray.remote(num_cpus=0)(_ray_visible)
        nodes = [n["NodeID"] for n in self.ray.nodes() if n.get("Alive")]
        refs = [
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(list(paths))
            for node in nodes
        ]
        for host, missing in self.ray.get(refs):
            if missing:
                raise RunError(
                    f"Ray worker on {host} cannot see {missing[0]}: models and the run directory reach"
                    " workers by path (use a shared filesystem, or Hub ids)"
                )

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        ray = self.ray
        refs = {self.remote.remote(job, self.spec, self.override): job for job in jobs}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                job = refs[ref]
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as error:  # the worker or node was lost twice (Ray retried once)
                    lost = f"Ray task lost twice ({type(error).__name__})"
                    yield JobResult(job.candidate, job.split, None, lost, None, 0.0, fault=lost)

    def close(self) -> None:
        self.ray.shutdown()
