"""The first unit's forward, begun while the build still plans the rest of its input.

Planning reads every record before the first model call (bad input must stop a build before anything
is written), so on an accelerator the model would idle for the whole plan, and for the weights' load
when this build is the process's first. A pooled-only build in this process writes nothing before a
unit's commit, and commits nothing before its plan is complete, so its unit 0 (plan.HeadStart: the
first new sequences read) is tokenised from the records the planner holds, and its weights loaded
and its forward run on a thread of its own meanwhile. The executor then takes it as its first unit
(executors.InProcess). When planning
fails (bad input, Ctrl-C), the forward is stopped and its work dropped: at most one unit
(build.HEAD_START_SEQUENCES) was computed for nothing.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from typing import Callable

from embedcache.config import BuildConfig
from embedcache.encoders import Encoder
from embedcache.encoders.base import transformers_progress
from embedcache.location import Location
from embedcache.partition import PreparedUnit, RunningUnit, UnitTask, encoder_for, forward_unit, named, prepare_unit
from embedcache.plan import Unit
from embedcache.spool import SpoolEntry

class HeadStartRun:
    """Unit 0's load, prepare and forward on a thread of its own: begun by the planner, taken by the executor."""

    def __init__(self, config: BuildConfig, location: Location, weights: dict | None, planner: Encoder, progress: bool,
                 log: Callable[[str], None]):  # fmt: skip
        self.config, self.location, self.weights, self.planner, self.progress, self.log = config, location, weights, planner, progress, log
        self.future: Future | None = None  # the RunningUnit, once begun
        self.stopping = threading.Event()
        self.taken = False

    def begin(self, unit: Unit, entries: list[SpoolEntry]) -> None:
        """Read unit 0 (its records as the planner holds them, with the planner's tokenizer: about a millisecond,
        here, since a thread beside the planning would wait for the interpreter's lock at every step), then
        load the weights and run its forward on a thread of its own."""
        self.future = Future()
        task = UnitTask(unit, self.config, self.location, self.weights)
        try:
            prepared = named(task, prepare_unit, task, self.planner, entries)
        except Exception as e:  # said when the executor takes the unit, as any unit's error
            self.future.set_exception(e)
            return
        threading.Thread(target=self._run, args=(task, prepared), name="embedcache-head-start", daemon=True).start()

    def _run(self, task: UnitTask, prepared: PreparedUnit) -> None:
        try:
            with transformers_progress(self.progress):
                encoder = encoder_for(self.config, self.weights)
            self.future.set_result(named(task, forward_unit, prepared, encoder, self.log, None, self.stopping.is_set))
        except BaseException as e:  # raised by running() in the build's thread
            self.future.set_exception(e)

    @property
    def begun(self) -> bool:
        return self.future is not None

    def running(self) -> RunningUnit:
        """Wait for unit 0's forward; the unit is the caller's from then on (to finish and commit, or abort)."""
        self.taken = True
        return self.future.result()

    def abort(self) -> None:
        """Stop the forward (before its next batch) and drop what it computed, unless the executor took the unit.
        Waits for the thread: the build neither deletes the spool nor leaves while it still reads."""
        if self.future is None or self.taken:
            return
        self.taken = True
        self.stopping.set()
        wait_holding_ctrl_c(self.future)
        if self.future.exception() is None:
            self.future.result().abort()


def wait_holding_ctrl_c(future: Future) -> None:
    """Wait until `future` is done, whichever way; a Ctrl-C meanwhile is held until then, and raised."""
    interrupted = False
    while not future.done():
        try:
            wait([future])
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
