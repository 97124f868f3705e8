"""Where units run: in this process (the default) or on a Dask cluster. One code path: both run a
unit's stages of `embedcache.partition` (prepare, forward, finish; a Dask worker through `run_unit`)
and hand each result back to the build as it finishes.

`--scheduler local[:N]` starts a dask.distributed LocalCluster of N single-threaded worker
processes (on a CUDA machine: dask-cuda's LocalCUDACluster when installed, one worker per GPU;
else one worker per visible device). `--scheduler tcp://HOST:PORT` or `--scheduler-file FILE`
attaches to a running cluster (dask-jobqueue, SLURM, Kubernetes). Each unit asks for one "GPU"
resource, so a worker runs one unit at a time whatever its device; workers keep their encoder
between units. A worker lost mid-unit has its unit rerun elsewhere (units are idempotent).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

from embedcache.errors import EmbedcacheError, StoreError
from embedcache.head_start import HeadStartRun
from embedcache.location import Location
from embedcache.partition import (
    RunningUnit,
    UnitInterrupted,
    UnitResult,
    UnitTask,
    encoder_for,
    finish_unit,
    forward_unit,
    named,
    prepare_unit,
    run_unit,
)
from embedcache.shard_writer import ShardBuffers

logger = logging.getLogger("embedcache")

OnResults = Callable[[list[UnitResult]], None]
OnSequences = Callable[[UnitTask, int], None]
Log = Callable[[str], None]
RESOURCE = "GPU"  # one unit per worker at a time: declared by workers, asked for by every unit


class Executor(ABC):
    name: str

    @abstractmethod
    def run(self, tasks: Iterable[UnitTask], on_results: OnResults, on_sequences: OnSequences | None = None,
            first: HeadStartRun | None = None) -> None:  # fmt: skip
        """Run every task; call `on_results` in this process with the units that finished, in completion order,
        and `on_sequences(task, n)` as n more sequences of a running unit finish, where the executor can tell.
        `first`: the first task's forward, begun while the build planned (embedcache.head_start; in-process only)."""

    def close(self) -> None:
        pass


class InProcess(Executor):
    """Units in this process, their stages overlapped (partition.prepare_unit, forward_unit, finish_unit):
    while a unit's forward runs, the next unit is read and planned on one thread and the previous one is
    finished (its last shard writes) and committed on another, so the model never waits for a unit to
    start or end. One unit ahead and one behind: memory holds at most three units' work.

    A pooled-only build's first unit may have begun while the build planned (`first`, embedcache.head_start):
    it is taken as the first forward, finished and committed like the others.

    Ctrl-C: the unit being finished is committed, then the running unit's finished sequences (as a
    smaller unit), then the build stops; a rerun recomputes at most the batches in flight (or, while the
    build waits for a head start's forward, that unit)."""

    name = "in-process"

    def __init__(self, log: Log = print):
        self.log = log

    def run(self, tasks: Iterable[UnitTask], on_results: OnResults, on_sequences: OnSequences | None = None,
            first: HeadStartRun | None = None) -> None:  # fmt: skip
        tasks = list(tasks)
        if not tasks:
            return
        encoder = encoder_for(tasks[0].config, tasks[0].weights)  # every task of a build has the same config and weights
        buffers = ShardBuffers()  # each unit's shard writer takes over the buffers of the one before

        def told(task: UnitTask) -> Callable[[int], None] | None:
            return None if on_sequences is None else (lambda n: on_sequences(task, n))

        def commit(running: RunningUnit) -> None:
            if running.claim():  # once, whichever thread gets there first (a Ctrl-C may race the commit thread)
                on_results([named(running.prepared.task, finish_unit, running)])

        def prepare(task: UnitTask) -> Future:
            return ahead.submit(named, task, prepare_unit, task, encoder)

        with ThreadPoolExecutor(1, thread_name_prefix="embedcache-prepare") as ahead, \
                ThreadPoolExecutor(1, thread_name_prefix="embedcache-commit") as behind:  # fmt: skip
            next_unit: Future | None = None if first is not None else prepare(tasks[0])
            committing: Future | None = None
            running: RunningUnit | None = None
            # The forward stops early when the unit being committed failed: its error ends the build at once.
            failed = lambda: committing is not None and committing.done() and committing.exception() is not None  # noqa: E731
            try:
                for i, task in enumerate(tasks):
                    begun = first if i == 0 else None
                    prepared = None if begun is not None else (next_unit or prepare(task)).result()
                    # A lone record (a chromosome) is prepared in its turn: its token ids alone may be gigabytes.
                    next_unit = prepare(tasks[i + 1]) if i + 1 < len(tasks) and tasks[i + 1].unit.n_sequences > 1 else None
                    running = begun.running() if begun is not None else \
                        named(task, forward_unit, prepared, encoder, self.log, told(task), failed, buffers)  # fmt: skip
                    _settle(committing)  # the previous unit, finished and committed beside this forward
                    committing, running = behind.submit(commit, running), None
                _settle(committing)
            except KeyboardInterrupt as stop:  # Ctrl-C: what has run is committed, then the build stops
                try:
                    _settle(committing)
                    if isinstance(stop, UnitInterrupted) and stop.result is not None:  # the running unit's finished part
                        on_results([stop.result])
                    elif running is not None:  # its forward had finished
                        commit(running)
                finally:
                    if running is not None and running.claim():  # not committed, nor being committed elsewhere
                        running.abort()
                    if first is not None:
                        first.abort()  # interrupted while waiting for it: its forward is dropped
                raise
            except BaseException:
                if running is not None:
                    running.abort()
                if first is not None:
                    first.abort()
                if next_unit is not None:
                    next_unit.cancel()
                raise


def _settle(committing: Future | None) -> None:
    """Wait for a unit's commit under way; its own error is what the build reports, when it failed."""
    if committing is not None:
        committing.result()


class DaskExecutor(Executor):
    """Units as Dask tasks; results come back to the build's process, which commits them."""

    def __init__(self, client, cluster=None, log: Log = print):
        self.client, self.cluster = client, cluster
        self.name = f"dask {client.scheduler.address}"
        link = getattr(client, "dashboard_link", None)
        workers = client.scheduler_info().get("workers", {})
        # Clusters started elsewhere may not declare the resource; then every worker takes units freely.
        declared = any(w.get("resources", {}).get(RESOURCE) for w in workers.values())
        self.resources = {RESOURCE: 1} if declared else None
        log(f"dask: {len(workers)} workers at {client.scheduler.address}" + (f"; dashboard {link}" if link else ""))

    def run(self, tasks: Iterable[UnitTask], on_results: OnResults, on_sequences: OnSequences | None = None,
            first: HeadStartRun | None = None) -> None:  # fmt: skip
        if first is not None:
            raise AssertionError("a head start runs in the build's process, not on Dask workers")
        from distributed import as_completed  # progress moves as units finish: workers report no batches

        futures = [
            self.client.submit(run_unit, task, key=f"embedcache-unit-{task.unit.index}-{task.location.url}",
                               resources=self.resources, retries=2, pure=False)  # fmt: skip
            for task in tasks
        ]
        try:
            # Units that finish while the last commit is written are committed together (one commit).
            for done in as_completed(futures).batches():
                on_results([f.result() for f in done])  # a unit's own error (UnitError) re-raises here, naming it
        finally:
            for f in futures:
                f.cancel()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _need_distributed():
    try:
        import distributed
    except ImportError as e:
        raise EmbedcacheError("--scheduler needs dask.distributed: pip install 'embedcache[dask]'") from e
    return distributed


def local_cluster(n_workers: int | None, log: Log = print):
    """A LocalCluster of worker processes: one per GPU on CUDA machines, else N (default: CPU cores)."""
    distributed = _need_distributed()
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus:
        try:
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(n_workers=n_workers or n_gpus, threads_per_worker=1, resources={RESOURCE: 1})
        except ImportError:
            log(f"dask-cuda is not installed: one plain worker per visible GPU ({n_gpus})")
            n_workers = n_workers or n_gpus
    n = n_workers or os.cpu_count() or 1
    # Workers share the machine's cores: one torch thread pool each, so N workers do not oversubscribe.
    threads = max(1, (os.cpu_count() or 1) // n)
    return distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, resources={RESOURCE: 1},
                                    dashboard_address=":0", env={"OMP_NUM_THREADS": str(threads)})  # fmt: skip


def make_executor(scheduler: str | None, scheduler_file: str | None = None, log: Log = print) -> Executor:
    """`None` -> in this process; "local" / "local:N" -> a new LocalCluster; "tcp://..." or a scheduler file -> attach."""
    if scheduler is None and scheduler_file is None:
        return InProcess(log)
    distributed = _need_distributed()
    if scheduler_file is not None:
        return DaskExecutor(distributed.Client(scheduler_file=scheduler_file), log=log)
    if scheduler == "local" or scheduler.startswith("local:"):
        count = scheduler.partition(":")[2]
        if count and not (count.isdigit() and int(count) > 0):
            raise EmbedcacheError(f"--scheduler {scheduler!r}: expected local or local:N with N a positive number of workers")
        cluster = local_cluster(int(count) if count else None, log)
        return DaskExecutor(distributed.Client(cluster), cluster, log=log)
    if "://" in scheduler:
        try:
            return DaskExecutor(distributed.Client(scheduler, timeout="20s"), log=log)
        except OSError as e:
            raise EmbedcacheError(f"cannot reach the Dask scheduler at {scheduler!r}: {e}") from e
    raise EmbedcacheError(f"--scheduler {scheduler!r}: expected local, local:N, or an address like tcp://host:8786")


def check_store_reach(location: Location, scheduler: str | None, scheduler_file: str | None, *, dry_run: bool = False) -> None:
    """Before any work: a store held in this process's memory (`memory://`) cannot be reached by Dask
    workers, which are other processes, so a build with a scheduler is refused; without one it runs,
    with one warning that the store is gone when the process ends (a CLI build keeps nothing)."""
    if not location.process_local:
        return
    if scheduler is not None or scheduler_file is not None:
        flag = f"--scheduler {scheduler}" if scheduler is not None else f"--scheduler-file {scheduler_file}"
        raise StoreError(
            f"store {location.url!r} lives in this process's memory, which the Dask workers of {flag} (other processes) "
            f"cannot reach; build it in this process (no --scheduler), or into a path or object store every worker can reach"
        )
    if not dry_run:
        logger.warning(f"embedcache: warning: store {location.url!r} lives only in this process's memory: it is gone when the process exits")
