"""Connector shutdown draining (PR #42423), as SimPy processes: one engine core's pending
asynchronous KV and EC connector operations, and what its shutdown does with them.

vLLM 0.26.0 tears an engine core down in ``EngineCore.shutdown()``::

    model_executor.shutdown()          -> Worker.shutdown()
        ensure_kv_transfer_shutdown()      worker-side KV connector .shutdown()
        ensure_ec_transfer_shutdown()      worker-side EC connector .shutdown()   (PR #42423)
    scheduler.shutdown()               -> Scheduler.shutdown()
        self.connector.shutdown()          scheduler-side KV connector
        self.ec_connector.shutdown()       scheduler-side EC connector            (PR #42423)

A connector's ``shutdown()`` waits for its own pending operations, so the core's shutdown lasts
until the last of them completes (unless the process is killed first: the engine manager's
``shutdown(procs, timeout)`` escalates to SIGKILL at its deadline). An operation whose connector
is never shut down is lost when the process exits, unless it happens to finish while other
connectors drain. Operations run concurrently (one thread each on the real side), so draining
one connector never delays another's operations.

Trace events (kind ``proc``) written here:

- ``op_done``   ``rank, connector, role, op``: an operation completed while the core was running
- ``connector_shutdown`` ``rank, connector, role``: that connector's ``shutdown()`` was called
  (their order is the shutdown order the checker compares)
- ``drain``     ``rank, connector, role, op``: completed after the core began its shutdown
- ``lost``      ``rank, connector, role, op``: pending when the process ended

``connector`` is ``kv`` or ``ec``; ``role`` is ``worker`` or ``scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import simpy

from .events import t as tr

CONNECTORS = ("kv", "ec")
ROLES = ("worker", "scheduler")
# EngineCore.shutdown(): the executor's Worker.shutdown() first, then Scheduler.shutdown().
SHUTDOWN_ORDER = (("worker", "kv"), ("worker", "ec"), ("scheduler", "kv"), ("scheduler", "ec"))


@dataclass(frozen=True)
class ConnectorOp:
    """An asynchronous connector operation: submitted at ``submit`` (if the core is still
    running then), in flight for ``dur`` seconds."""

    rank: int
    connector: str
    role: str
    op: str
    submit: float
    dur: float

    def __post_init__(self):
        if self.connector not in CONNECTORS:
            raise ValueError(f"op {self.op}: connector must be one of {CONNECTORS}, got {self.connector!r}")
        if self.role not in ROLES:
            raise ValueError(f"op {self.op}: role must be one of {ROLES}, got {self.role!r}")
        if self.submit < 0 or self.dur <= 0:
            raise ValueError(f"op {self.op}: needs submit >= 0 and dur > 0")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "connector": self.connector, "role": self.role, "op": self.op,
                "submit": self.submit, "dur": self.dur}


@dataclass(frozen=True)
class DrainPolicy:
    """Which connectors an engine core's shutdown calls ``shutdown()`` on."""

    name: str
    kv_shutdown: bool = True
    ec_shutdown: bool = True

    def shutdown_steps(self) -> tuple[tuple[str, str], ...]:
        on = {"kv": self.kv_shutdown, "ec": self.ec_shutdown}
        return tuple((role, conn) for role, conn in SHUTDOWN_ORDER if on[conn])


DRAIN_POLICIES = {
    # vLLM >= 0.23.0 (PR #42423): Scheduler.shutdown() and Worker.shutdown() shut down both connectors
    "pr42423": DrainPolicy("pr42423"),
    # before PR #42423: only the KV connector had a shutdown path; EC operations are left behind
    "pre-pr42423": DrainPolicy("pre-pr42423", ec_shutdown=False),
}


class ConnectorOps:
    """One rank's connector operations. The engine core calls :meth:`begin_shutdown`,
    runs :meth:`shutdown` per connector (a generator to ``yield from``), and :meth:`process_exit`
    when the process ends, however it ends."""

    def __init__(self, env: simpy.Environment, rank: int, ops: list[ConnectorOp],
                 emit: Callable[[dict], None], running: Callable[[], bool]):
        self.env = env
        self.rank = rank
        self._emit = emit
        self._running = running
        self.pending: dict[str, tuple[ConnectorOp, simpy.Event]] = {}
        self.shutting_down = False
        self.exited = False
        for op in sorted(ops, key=lambda o: (o.submit, o.op)):
            env.process(self._run_op(op))

    def _event(self, event: str, op: ConnectorOp | None = None, **fields) -> None:
        e = {"kind": "proc", "t": tr(self.env.now), "event": event, "rank": self.rank, **fields}
        if op is not None:
            e.update(connector=op.connector, role=op.role, op=op.op)
        self._emit(e)

    def _run_op(self, op: ConnectorOp):
        yield self.env.timeout(op.submit)
        if self.exited or not self._running():
            return  # the core no longer submits work
        done = self.env.event()
        self.pending[op.op] = (op, done)
        yield self.env.timeout(op.dur)
        if self.exited:
            return  # died with the process (recorded as lost at exit)
        del self.pending[op.op]
        self._event("drain" if self.shutting_down else "op_done", op)
        done.succeed()

    def begin_shutdown(self) -> None:
        self.shutting_down = True

    def shutdown(self, role: str, connector: str):
        """``<connector>.shutdown()``: returns once its pending operations have completed."""
        self._event("connector_shutdown", connector=connector, role=role)
        waits = [done for op, done in self.pending.values() if op.role == role and op.connector == connector]
        if waits:
            yield simpy.AllOf(self.env, waits)

    def process_exit(self) -> None:
        """The process is gone: whatever is still pending is lost."""
        self.exited = True
        for op, _ in sorted(self.pending.values(), key=lambda p: p[0].op):
            self._event("lost", op)
        self.pending.clear()
