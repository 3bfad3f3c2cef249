"""The client in front of a deployment: its retry policy (tries, backoff, timeout) and what each
request comes to, as the client sees it.

A request is sent at its arrival; a try that fails (the engine died: ``failed``; aborted by a
graceful shutdown: ``aborted``; refused because no server is up: ``rejected``) is retried after
``backoff_s * backoff_multiplier ** (tries - 1)`` while tries remain and the retry can start
before the timeout. A retry is a new request to vLLM (``<id>~<try>``, sent when it is made). The
request ends exactly once:

- ``finished``: a try finished (``length`` or ``stop``) within ``timeout_s`` of the first send;
- ``failed``: the last try failed and no retry is left (tries used up, or none could start in time);
- ``lost``: no answer within ``timeout_s`` (the try in flight is abandoned; vLLM keeps running it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Callable, Iterable

import simpy
from pydantic import Field

from ..inputs import NonNegative, Positive, PositiveInt
from . import events
from .events import Emit
from .request import RequestSpec

DONE = ("length", "stop")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: PositiveInt = 3         # tries per request, the first included
    backoff_s: NonNegative = 1.0      # wait after the first failed try
    backoff_multiplier: Annotated[float, Field(ge=1)] = 2.0
    timeout_s: Positive = 60.0        # from the first send: no answer by then and the request is lost

    def backoff(self, tries: int) -> float:
        """The wait after the `tries`-th failed try."""
        return self.backoff_s * self.backoff_multiplier ** (tries - 1)


# send(spec) -> the event a try's ``req`` trace event succeeds (its fate), or None: rejected
Send = Callable[[RequestSpec], "simpy.Event | None"]


class Client:
    """Sends each request of `workload` at its arrival through `send`, retrying per `policy`; emits
    one ``client`` event per request; ``done`` succeeds once every request has ended."""

    def __init__(self, env: simpy.Environment, workload: Iterable[RequestSpec], send: Send,
                 policy: RetryPolicy, emit: Emit):
        """`workload`: the requests in arrival order, pulled one at a time as the clock reaches them."""
        self.env, self.send, self.policy, self.emit = env, send, policy, emit
        self.workload = workload
        self.pending = 0   # requests sent, not ended
        self.sending = True  # requests of the workload still to send
        self.done = env.event()
        self.retries = 0   # tries after the first, over all requests
        self.rejected = 0  # tries refused: no server up
        env.process(self._arrivals())

    def _arrivals(self):
        env = self.env
        for spec in self.workload:
            if spec.arrival > env.now:
                yield env.timeout(spec.arrival - env.now)
            self.pending += 1
            env.process(self._request(spec))
        self.sending = False
        if self.pending == 0:
            self.done.succeed()

    def _request(self, spec: RequestSpec):
        env, policy = self.env, self.policy
        deadline = spec.arrival + policy.timeout_s
        tries, fate = 0, None
        while True:
            attempt = spec if tries == 0 else replace(spec, req_id=f"{spec.req_id}~{tries}", arrival=env.now)
            tries += 1
            sent = self.send(attempt)
            if sent is None:
                self.rejected += 1
                fate = None
            else:
                timeout = env.timeout(deadline - env.now)
                yield env.any_of((sent, timeout))
                if not sent.triggered:
                    return self._end(spec, "lost", tries, None)
                fate = sent.value
                if fate["status"] in DONE:
                    return self._end(spec, "finished", tries, fate)
            if tries >= policy.attempts or env.now + policy.backoff(tries) >= deadline:
                return self._end(spec, "failed", tries, fate)
            self.retries += 1
            yield env.timeout(policy.backoff(tries))

    def _end(self, spec: RequestSpec, status: str, tries: int, fate: dict | None) -> None:
        ok = status == "finished"
        self.emit(events.client(self.env.now, spec.req_id, status, spec.arrival, tries,
                                None if fate is None else fate.get("server"), fate["first_token"] if ok else None,
                                fate["finish"] if ok else None, fate["num_output"] if ok else None))
        self.pending -= 1
        if self.pending == 0 and not self.sending:
            self.done.succeed()
