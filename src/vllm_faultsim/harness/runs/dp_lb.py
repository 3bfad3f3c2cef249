"""The DP load-balancing check's runs: one request stream through front-end clients, the DP
coordinator and stand-in engine queues, on the twins (models/dp_lb.py) or on vLLM's own code
(drivers/real_dp_lb.py); the first divergence of two runs; a replay command.

A :class:`Case` is ``client_count`` clients (API servers) in front of ``num_ranks`` engines. Each
request arrives at one client, which picks its rank (``choose``; some carry an explicit
``data_parallel_rank``) and sends it to that engine (``route_delay_ms`` later it joins the
engine's waiting queue). The engines step in lock step every ``step_ms`` (MoE data parallel: one
``step_counter`` for all ranks) as ``DPEngineCoreProc.run_busy_loop`` does: new requests join
``waiting``, ``_maybe_publish_request_counts`` (stats if the engine's counts changed), the step
(up to ``max_num_seqs`` running: waiting ones are admitted; each running request finishes after
its number of steps), ``_maybe_publish_request_counts`` again. Stats reach the coordinator
``stats_delay_ms`` after they are sent (not at all when ``engines_send_stats`` is false, as with
dense models' engines); its publications reach every client ``publish_delay_ms`` later. Times are
whole milliseconds; events at the same millisecond are taken in a fixed order (stats at the
coordinator, publications at the clients, arrivals, requests at engines, engine steps), the
coordinator's own publication between stats and the rest.

A run's record is the list of ``("publish", t_ms, counts)`` and ``("choose", t_ms, request,
rank)``: the twins and vLLM's code must give the same records, event for event.

``python -m vllm_faultsim.harness.runs.dp_lb --replay case.json [--mutant NAME]`` runs a saved case
on both sides and prints the first divergence.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import asdict, dataclass, field

from ...models.dp_lb import DPCoordinator, DPLoadBalancer
from ..mutants import DP_LB_MUTANTS

_STATS, _PUBLICATION, _ARRIVAL, _AT_ENGINE, _STEP = range(5)   # order of events at the same millisecond


@dataclass(frozen=True)
class Request:
    arrival_ms: int
    client: int
    steps: int   # engine steps it runs for once admitted
    data_parallel_rank: int | None = None


@dataclass(frozen=True)
class Case:
    num_ranks: int
    client_count: int
    requests: tuple[Request, ...]
    step_ms: int = 20
    max_num_seqs: int = 4
    stats_delay_ms: int = 1
    publish_delay_ms: int = 1
    route_delay_ms: int = 1
    engines_send_stats: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Case:
        d = json.loads(text)
        return cls(**{**d, "requests": tuple(Request(**r) for r in d["requests"])})


@dataclass
class _Engine:
    waiting: list[int] = field(default_factory=list)   # each request's steps
    running: list[int] = field(default_factory=list)   # each request's steps left
    last_counts: tuple[int, int] = (0, 0)              # DPEngineCoreProc.last_counts


def run_case(case: Case, side: str = "sim", mutant: str | None = None) -> list[tuple]:
    """The record of ``case`` on the twins (``side="sim"``, optionally with a mutant balancer or
    coordinator of ``DP_LB_MUTANTS``) or on vLLM's code (``side="real"``)."""
    if side == "real":
        from ..drivers.real_dp_lb import RealDPCoordinator, RealDPLBClient
        make_client, coordinator = RealDPLBClient, RealDPCoordinator(case.num_ranks)
    else:
        broken = DP_LB_MUTANTS[mutant] if mutant else None
        make_client = broken if broken and issubclass(broken, DPLoadBalancer) else DPLoadBalancer
        coordinator = (broken if broken and issubclass(broken, DPCoordinator) else DPCoordinator)(case.num_ranks)
    clients = []
    try:
        for i in range(case.client_count):
            clients.append(make_client(case.num_ranks, client_count=case.client_count, client_index=i))
        return _run(case, clients, coordinator)
    finally:
        for c in clients:
            getattr(c, "close", lambda: None)()
        getattr(coordinator, "close", lambda: None)()


def _run(case: Case, clients, coordinator) -> list[tuple]:
    record: list[tuple] = []
    engines = [_Engine() for _ in range(case.num_ranks)]
    heap: list[tuple] = []
    seq = 0

    def push(t_ms, kind, payload):
        nonlocal seq
        heapq.heappush(heap, (t_ms, kind, seq, payload))
        seq += 1

    for i, r in enumerate(case.requests):
        push(r.arrival_ms, _ARRIVAL, i)
    push(0, _STEP, 0)
    pending = len(case.requests)   # not yet finished

    def send_stats(t_ms, rank, step_counter):
        eng = engines[rank]
        counts = (len(eng.running), len(eng.waiting))   # Scheduler.get_request_counts()
        if counts != eng.last_counts:
            eng.last_counts = counts
            if case.engines_send_stats:
                push(t_ms + case.stats_delay_ms, _STATS, (rank, counts[1], counts[0], step_counter))

    while heap:
        t_ms, kind, _, payload = heap[0]
        publish_ms = round(coordinator.publish_time() * 1000)
        if publish_ms < t_ms or publish_ms == t_ms and kind != _STATS:
            counts = coordinator.maybe_publish(publish_ms / 1000)
            record.append(("publish", publish_ms, counts))
            push(publish_ms + case.publish_delay_ms, _PUBLICATION, counts)
            continue
        heapq.heappop(heap)
        if kind == _STATS:
            rank, waiting, running, step_counter = payload
            coordinator.scheduler_stats(t_ms / 1000, rank, waiting, running, step_counter)
        elif kind == _PUBLICATION:
            for c in clients:
                c.publish(payload)
        elif kind == _ARRIVAL:
            r = case.requests[payload]
            rank = clients[r.client].choose(r.data_parallel_rank)
            record.append(("choose", t_ms, payload, rank))
            push(t_ms + case.route_delay_ms, _AT_ENGINE, (rank, r.steps))
        elif kind == _AT_ENGINE:
            rank, steps = payload
            engines[rank].waiting.append(steps)
        else:   # the engines' step `payload`, all ranks in lock step
            step_counter = payload
            for rank, eng in enumerate(engines):
                send_stats(t_ms, rank, step_counter)
                while eng.waiting and len(eng.running) < case.max_num_seqs:
                    eng.running.append(eng.waiting.pop(0))
                eng.running = [left - 1 for left in eng.running]
                pending -= sum(1 for left in eng.running if left == 0)
                eng.running = [left for left in eng.running if left > 0]
                send_stats(t_ms + case.step_ms, rank, step_counter)
            if pending:
                push(t_ms + case.step_ms, _STEP, step_counter + 1)
    return record


def first_divergence(left: list[tuple], right: list[tuple]) -> str | None:
    """Where two records first differ (None: they are equal)."""
    for i, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return f"event {i}: {a} != {b}"
    if len(left) != len(right):
        return f"event {min(len(left), len(right))}: one record ends ({len(left)} vs {len(right)} events)"
    return None


def replay_command(path: str, mutant: str | None = None) -> str:
    return f"python -m vllm_faultsim.harness.runs.dp_lb --replay {path}" + (f" --mutant {mutant}" if mutant else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_faultsim.harness.runs.dp_lb",
                                 description="Replay a DP load-balancing case on the twins and on vLLM's code.")
    ap.add_argument("--replay", required=True, metavar="CASE_JSON")
    ap.add_argument("--mutant", choices=sorted(DP_LB_MUTANTS))
    args = ap.parse_args(argv)
    try:
        with open(args.replay, encoding="utf-8") as f:
            case = Case.from_json(f.read())
    except KeyError as exc:
        print(f"{args.replay}: not a DP load-balancing case (no field {exc})", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError) as exc:
        print(f"{args.replay}: not a DP load-balancing case ({exc})", file=sys.stderr)
        return 2
    sim, real = run_case(case, "sim", args.mutant), run_case(case, "real")
    div = first_divergence(sim, real)
    print(f"{len(real)} events ({sum(e[0] == 'choose' for e in real)} choices): "
          + (f"twin{' (' + args.mutant + ')' if args.mutant else ''} vs vLLM: {div}" if div else "identical"))
    return 1 if div else 0


if __name__ == "__main__":
    sys.exit(main())
