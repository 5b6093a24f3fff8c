"""The engine in a thread of the test's process (tests/loop): started, watched and stopped as the
daemon does it, and never outliving its test (tests/loop/conftest.py ends them all)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from nightlab.loop.engine import run_engine
from nightlab.loop.executors import RunHandle
from nightlab.loop.executors.local import LocalExecutor
from nightlab.loop.proposers import Proposer
from nightlab.loop.state import ledger
from nightlab.loop.state.config import Settings
from nightlab.loop.state.store import Store

from tests.waiting import wait_until


class EngineThread:
    """The engine in a thread of this process, stoppable like the daemon stops it."""

    started: ClassVar[list[EngineThread]] = []  # until end_all(), at the end of each test

    def __init__(self, settings: Settings, proposer: Proposer, limit: int | None = None) -> None:
        self.stop = threading.Event()
        self.result: list[Any] = []
        self.store = Store.for_workspace(settings.workspace_path)

        def target() -> None:
            try:
                self.result.append(run_engine(settings, limit, self.stop, proposer=proposer))
            except BaseException as exc:  # noqa: BLE001 -- surfaced by join()
                self.result.append(exc)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        EngineThread.started.append(self)

    def ended(self) -> str | None:
        return None if self.thread.is_alive() else f"the engine ended: {self.result}"

    def wait_for(self, predicate: Callable[[], Any], what: str) -> Any:
        # wait_until's bound (60 s; was 30 here): it bounds a failure, never a speed, and a loaded
        # 2-core box took over 30 s to cancel a run under `pause now`
        return wait_until(predicate, what, abort=self.ended)

    def ticks(self, count: int = 2) -> None:
        """Wait for `count` more checkpoints: each round of the loop ticks, and then decides what
        to start; after two ticks it has decided at least once since the call."""
        for _ in range(count):
            tick = self.store.get("engine.tick")
            self.wait_for(lambda: self.store.get("engine.tick") != tick, "the engine's next checkpoint")

    def running(self, number: int) -> ledger.RunRecord:
        def find() -> ledger.RunRecord | None:
            runs = ledger.running_runs(self.store)
            ok = runs and ledger.get_candidate(self.store, runs[-1].candidate_id).number == number
            return runs[-1] if ok else None

        return self.wait_for(find, f"#{number} to run")

    def join(self, stop: bool = False) -> Any:
        if stop:
            self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if isinstance(self.result[0], BaseException):
            raise self.result[0]
        return self.result[0]

    @classmethod
    def end_all(cls) -> None:
        """Stop every engine started so far and cancel the runs they left in flight: the engine of
        a test that failed half-way went on, launching runs beside the tests after it."""
        while cls.started:
            engine = cls.started.pop()
            engine.stop.set()
            engine.thread.join(60)
            for run in ledger.running_runs(engine.store):
                LocalExecutor().cancel(RunHandle.from_json(run.handle), grace_s=1)
