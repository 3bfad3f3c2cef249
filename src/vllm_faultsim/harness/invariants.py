"""Invariants checked after every engine step; a violation stops the run naming the step.

- the clock never goes back; a step ends after it starts
- causality: only requests that have arrived and not finished are scheduled (a request's arrival
  is checked once, as the engine adds it to the core)
- limits: scheduled tokens <= max_num_batched_tokens, running <= max_num_seqs
- requests are conserved: arrived = finished + failed + running + waiting
- the core's own invariants (``core.check()``: KV blocks conserved, queues consistent)
- work conservation: the engine never sleeps with work it could run and nothing to wake it
"""

from __future__ import annotations


class InvariantViolation(RuntimeError):
    def __init__(self, step: int, t: float, what: str):
        super().__init__(step, t, what)  # SimPy re-raises failures by re-creating them from args
        self.step, self.t, self.what = step, t, what

    def __str__(self) -> str:
        return f"invariant violated at step {self.step} (t={self.t:.6f}s): {self.what}"


class Invariants:
    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int):
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.last_t = 0.0

    def _clock(self, step: int, start: float, end: float) -> None:
        if start < self.last_t or end < start:
            raise InvariantViolation(step, start, f"clock went back ({self.last_t} -> {start} -> {end})")
        self.last_t = end

    def added(self, step: int, now: float, req_id: str, arrival: float) -> None:
        """A request handed to the core at `now` (its record made): it has arrived. A batch's
        requests are in the records (:meth:`scheduled`), so each had arrived by the start of any
        batch that holds it (the clock does not go back): its arrival is checked once, here."""
        if arrival > now:
            raise InvariantViolation(step, now, f"request {req_id} added to the core at {now} before it arrived "
                                                f"({arrival})")

    def scheduled(self, step: int, start: float, end: float, res, records) -> None:
        """Before the step's output is applied: clock, causality (only requests added and not left are
        scheduled; their arrival: :meth:`added`), limits."""
        self._clock(step, start, end)
        sched = res.sched
        # the checks over the batch in C; _culprit names the request
        if not (sched.keys() <= records.keys() and (not sched or min(sched.values()) > 0)):
            _culprit(step, start, sched, records)
        total = sum(sched.values())
        if total > self.max_tokens:
            raise InvariantViolation(step, start, f"{total} tokens scheduled > max_num_batched_tokens {self.max_tokens}")

    def scheduled_again(self, step: int, start: float, end: float) -> None:
        """A decode run's later steps (models/engine.py ``_decode_steps``): the batch is the one
        :meth:`scheduled` checked at the run's first step, and the run adds no arrival and applies
        no output until it ends, so causality and limits hold as they held then: only the clock is
        new."""
        self._clock(step, start, end)

    def after_step(self, step: int, t: float, core, stats) -> None:
        """After the output is applied: conservation and the core's own invariants."""
        running, waiting = core.counts()
        if running > self.max_seqs:
            raise InvariantViolation(step, t, f"{running} running > max_num_seqs {self.max_seqs}")
        if stats.arrived != stats.finished + stats.failed + stats.aborted + running + waiting:
            raise InvariantViolation(step, t, f"requests not conserved: arrived {stats.arrived} != finished "
                                              f"{stats.finished} + failed {stats.failed} + aborted {stats.aborted} "
                                              f"+ running {running} "
                                              f"+ waiting {waiting}")
        check = getattr(core, "check", None)
        problem = check() if check is not None else None
        if problem:
            raise InvariantViolation(step, t, problem)

    def idle(self, step: int, now: float, wake: float | None, core) -> None:
        if wake is None:
            running, waiting = core.counts()
            raise InvariantViolation(step, now, f"engine stalled: nothing schedulable and nothing to wait for, "
                                                f"with {running} running and {waiting} waiting requests "
                                                "(a request larger than the KV cache?)")


def _culprit(step: int, start: float, sched: dict, records) -> None:
    """The first scheduled request that was not added, had left, or got no tokens."""
    for rid, n in sched.items():
        if rid not in records:
            raise InvariantViolation(step, start, f"request {rid} scheduled before it arrived or after it left")
        if n <= 0:
            raise InvariantViolation(step, start, f"request {rid} scheduled {n} tokens")
