"""The first unit's forward, begun while the build still plans the rest of its input.

Planning reads every record before the first model call (bad input must stop a build before anything
is written), so on an accelerator the model would idle for the whole plan, and for the weights' load
when this build is the process's first. A pooled-only build in this process writes nothing before a
unit's commit, and commits nothing before its plan is complete, so its unit 0 (plan.HeadStart: the
first new sequences read) is read back and tokenised on the planning thread (a millisecond or two),
and the weights are loaded and its forward run on a thread of its own meanwhile. The executor then
takes it as its first unit (executors.InProcess). When planning fails (bad input, Ctrl-C), the
forward is stopped before its next batch and its work dropped: at most one unit
(build.HEAD_START_SEQUENCES) was computed for nothing. A weights' load under way cannot be stopped:
the build does not wait for it; its thread ends when it does, without a forward.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable

from embedcache.config import BuildConfig
from embedcache.encoders import Encoder
from embedcache.encoders.base import transformers_progress
from embedcache.location import Location
from embedcache.partition import PreparedUnit, RunningUnit, UnitTask, encoder_for, forward_unit, named, prepare_unit
from embedcache.plan import Unit

LOAD_WAIT_S = 1.0  # how long a stopped head start's weights load is waited for (a kept encoder is found at once)


class HeadStartRun:
    """Unit 0's prepare (on the planner's thread), load and forward (on a thread of its own): begun by the
    planner, taken by the executor. Whoever claims the unit's RunningUnit (partition: once) finishes and
    commits it, or aborts it; `abort()` claims it when the executor has not."""

    def __init__(self, config: BuildConfig, location: Location, weights: dict | None, planner: Encoder, progress: bool,
                 log: Callable[[str], None]):  # fmt: skip
        self.config, self.location, self.weights, self.planner, self.progress, self.log = config, location, weights, planner, progress, log
        self.future: Future | None = None  # unit 0's RunningUnit (None: stopped before its forward), once begun
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.loading = False  # the weights' load under way: it cannot be stopped, nor is it waited for

    def begin(self, unit: Unit) -> None:
        """Read and tokenise unit 0 here (a thread beside the planning would wait for the interpreter's lock at
        every step), then start its thread."""
        self.future = Future()
        task = UnitTask(unit, self.config, self.location, self.weights)
        try:
            prepared = named(task, prepare_unit, task, self.planner)
        except Exception as e:  # said when the executor takes the unit, as any unit's error
            self.future.set_exception(e)
            return
        self.thread = threading.Thread(target=self._run, args=(task, prepared), name="embedcache-head-start", daemon=True)
        self.thread.start()

    def _run(self, task: UnitTask, prepared: PreparedUnit) -> None:
        try:
            self.loading = True
            encoder = None
            if not self.stopping.is_set():
                with transformers_progress(self.progress):
                    encoder = named(task, encoder_for, self.config, self.weights)
            self.loading = False
            stopped = self.stopping.is_set()
            self.future.set_result(None if stopped else named(task, forward_unit, prepared, encoder, self.log, None, self.stopping.is_set))
        except BaseException as e:  # raised by running() in the build's thread
            self.future.set_exception(e)
        finally:
            self.loading = False

    @property
    def begun(self) -> bool:
        return self.future is not None

    def running(self) -> RunningUnit:
        """Wait for unit 0's forward; the executor claims the unit when it finishes or aborts it."""
        return self.future.result()

    def abort(self) -> None:
        """Stop the forward (before its next batch) and drop what it computed, unless the executor claimed it.
        Waits for the thread, except for a weights' load under way (LOAD_WAIT_S at most: it cannot be stopped;
        the thread ends after it, without a forward). A Ctrl-C meanwhile is held until then, and raised."""
        if self.future is None:
            return
        self.stopping.set()
        interrupted = False
        while self.thread is not None and self.thread.is_alive():
            try:
                self.thread.join(timeout=LOAD_WAIT_S if self.loading else None)
            except KeyboardInterrupt:
                interrupted = True
            if self.loading:
                break
        if self.future.done() and self.future.exception() is None and (running := self.future.result()) is not None:
            if running.claim():  # not committed, nor being committed, by the executor
                running.abort()
        if interrupted:
            raise KeyboardInterrupt

