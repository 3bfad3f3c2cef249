"""The engine-process fault matrix: each case run for real (drivers/real_procs.py) and in the model
(models/engine_procs.py), compared by the checker (checkers/procs.py); mutants judged. The sim side of
each case takes the detection latencies (:class:`MeasuredLatency`) and the connector operations' times
the real run measured (:func:`like_the_run`): classifications are compared, latencies only reported
(benchmarks/detection_latency.py judges them)."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from ...faults.plan import PHASES, SIGNALS, FaultPlan, validate_plan
from ...faults.sim_injector import SimInjector
from ...models.engine_procs import POLICIES, LatencyModel, LivenessPolicy, ProcScenario, ProcSim
from ...models.shutdown_drain import ConnectorOp
from ..checkers.procs import (MATRIX_PHASES, classify, code0_naming, compare_code0_naming, compare_latency,
                              fate_differences, latencies)
from ..mutants import PROCS_MUTANTS
from ..trace import Trace, header

MAX_ATTEMPTS = 3    # a real run that is no valid history for its case is run again up to this many times
SLIP_LIMIT = 0.03
# The matrix scenario's boundaries are >= 40 ms apart. The sim side takes the detection latency the
# real run measured, which a loaded host stretches (15-45 ms idle, 130-650 ms with both cores busy):
# a run is judged unless the model's classification changes when that latency moves by GUARD either
# way (the run then lies on a boundary, where the real code's own jitter decides). The model takes
# the client's death notice as immediate: a run whose probe or end-of-run stop fell between the last
# exit and the notice is no valid history either (the notice's delay decided that call's outcome).
GUARD = 0.04


def as_run(sc: ProcScenario, real: list[dict]) -> ProcScenario:
    """The scenario as a real run had it: each operation submitted when it was and lasting as long
    as it did (the planned duration for one that never completed; none that was never submitted),
    the probe and the end-of-run stop when the driver made them. What a loaded host does to the
    driver's own threads is then no slip; what vLLM's code made of those times is compared."""
    times = real[-1]["op_times"]
    ops = []
    for op in sc.ops:
        if op.op in times:
            submit, done = times[op.op]
            ops.append(replace(op, submit=submit, dur=op.dur if done is None else done - submit))
    probe = next(e["t"] for e in real if e.get("event") in ("request_failed", "request_accepted"))
    stop = next((e["t"] for e in real if e.get("event") == "stop" and e["cause"] == "end"), sc.duration)
    return replace(sc, ops=tuple(ops), probe_at=probe, duration=max(stop, probe + 1e-6))


def off_schedule(sc: ProcScenario, real: list[dict]) -> str | None:
    """Why a real matrix run is no valid history for its case (None: it is): a fault slipped behind
    its schedule, an operation submitted late crossed the fault on its rank, one that never
    completed outlived its planned duration, an exit was not yet detected when the client stopped,
    or a client call fell between the last exit and the engine being seen dead."""
    slip = real[-1]["max_slip"]
    if slip > SLIP_LIMIT:
        return f"slipped {slip * 1e3:.0f} ms behind its schedule ({real[-1]['slipped']})"
    planned = {op.op: op.dur for op in sc.ops}
    exit_at = {e["rank"]: e["t"] for e in real if e.get("kind") == "proc" and e["event"] == "exit"}
    for op in sc.ops:   # a late submission that crossed the fault: the model's rank stopped taking work
        hit = [e["t"] for e in real if e.get("t") is not None and (
            e.get("kind") == "fault" and e["applied"] and (e["rank"] == op.rank or e["fault"]["signal"] == "stop")
            or e.get("kind") == "proc" and (e["event"] == "shutdown"
                                            or e["event"] in ("core_shutdown", "exit") and e["rank"] == op.rank))]
        submit = real[-1]["op_times"].get(op.op, [None])[0]
        if hit and submit is not None and op.submit < min(hit) <= submit:
            return (f"{op.op} was submitted at {submit:.3f} s, after the fault reached its rank "
                    f"({min(hit):.3f} s; planned {op.submit:.3f} s)")
    for e in real:
        if e.get("kind") == "proc" and e["event"] == "lost":
            submit, _ = real[-1]["op_times"][e["op"]]
            late = exit_at[e["rank"]] - submit - planned[e["op"]]
            if late > SLIP_LIMIT:
                return f"{e['op']} was still pending {late * 1e3:.0f} ms after its planned end"
    c = classify(real)
    shutdowns = [e["t"] for e in real if e.get("kind") == "proc" and e["event"] == "shutdown"]
    if not c["detect"] and not c["monitor_error"] and c["manager_shutdowns"][:1] == ["client"]:
        gone = [(exit_at[r], r) for r, by in c["exit_by"].items() if by == "self"]
        if gone:
            t, r = min(gone)
            return (f"the monitor had not seen rank {r}'s exit ({t:.3f} s) when the client stopped "
                    f"({shutdowns[0]:.3f} s): a detection slower than {(shutdowns[0] - t) * 1e3:.0f} ms")
    exits = [e["t"] for e in real if e.get("kind") == "proc" and e["event"] == "exit" and e["t"] is not None]
    dead = [e["t"] for e in real if e.get("kind") == "proc" and e["event"] == "engine_dead"]
    calls = [e for e in real if e.get("kind") == "proc" and (e["event"] in ("request_failed", "request_accepted")
                                                              or e["event"] == "stop" and e["cause"] == "end")]
    for c in calls:
        if exits and dead and max(exits) <= c["t"] < dead[0]:
            return (f"its {c['event']} at {c['t']:.3f} s fell between the last exit ({max(exits):.3f} s) and "
                    f"the engine seen dead ({dead[0]:.3f} s)")
    return None


def like_the_run(sc: ProcScenario, plan: FaultPlan, policy: str, seed: int, model: LatencyModel, real: list[dict], *,
                 shift: float = 0.0, trace_path: str | Path | None = None) -> list[dict]:
    """The model of a real run's case, conditioned on what the run measured: its operations' times
    (:func:`as_run`) and its detection latencies (moved by ``shift``, never below 1 ms: at 0 the
    shutdown would tie with the exit)."""
    seen = [max(0.001, x + shift) if shift else x for _, x in latencies(real)]
    return simulate_procs(as_run(sc, real), plan, policy, seed=seed, latency=MeasuredLatency(model, seen),
                          trace_path=trace_path)


def on_a_boundary(sc: ProcScenario, plan: FaultPlan, policy: str, seed: int, model: LatencyModel,
                  real: list[dict], sim: list[dict]) -> str | None:
    """Why the model's classification of a real run (``sim``, :func:`like_the_run`) hinges on its
    measured detection latencies (None: it does not): it changes when they move by :data:`GUARD`
    either way."""
    for d in (-GUARD, GUARD):
        diffs = fate_differences(like_the_run(sc, plan, policy, seed, model, real, shift=d), sim)
        if diffs:
            return (f"detection {', '.join(f'{x * 1e3:.0f}' for _, x in latencies(real))} ms lies on a boundary "
                    f"of the scenario ({d * 1e3:+.0f} ms changes the model's {diffs[0].split(':')[0]})")
    return None


def simulate_procs(sc: ProcScenario, plan: FaultPlan, policy: LivenessPolicy | str = "mp-0.26", *, seed: int = 0,
                   latency: LatencyModel | None = None, trace_path: str | Path | None = None) -> list[dict]:
    """Run the engine-process model once under `plan` (its kills armed by the simulator's
    injector); returns the trace's events (also written to ``trace_path``)."""
    policy = {**POLICIES, **PROCS_MUTANTS}[policy] if isinstance(policy, str) else policy
    with Trace(trace_path) as trace:
        trace.emit(header("sim", seed, {"policy": policy.name, "scenario": sc.to_dict(), "plan": plan.to_dict()}))
        ProcSim(sc, SimInjector(plan).kills(), policy, seed=seed, latency=latency, emit=trace.emit).run()
    return trace.events


# where the matrix's pending operations end, per backend: (s between the ranks' ends, s all of them
# and the probe come later, s the probe and the end-of-run set come later still); see matrix_scenario
MATRIX_TIMING = {"mp": (0.3, 0.0, 0.0), "ray": (0.8, 0.3, 0.3)}


def matrix_scenario(dp_size: int = 2, backend: str = "mp") -> ProcScenario:
    """The matrix's scenario: every rank steps in [0.2, 0.6) (faults at 0.45: mid-step at 0.45,
    idle at 0.63); each rank has one operation per connector and role pending over the fault
    (KV ones end 0.15 s before EC ones, ranks 0.3 s apart, so an EC connector whose shutdown is
    skipped loses them), the probe at 1.75 s, and another set pending over the end-of-run stop at
    2.0 s (KV ends at 2.05, drained before a shutdown-phase fault at ~2.1; EC at 2.2, lost to it).
    Every boundary is >= 40 ms from the next event; the probe comes >= 300 ms after the last exit
    of a case (~1.45 s on a loaded host), which the client's death notice takes 100-150 ms to
    follow there.

    The operations' ends set the detection latencies at which the model's classification changes
    (what is drained, lost or done): for MP at 150 ms and more, clear of its sentinels (10-70 ms,
    loaded too). ``ray.wait`` wakes 10-410 ms after an exit on a loaded host, so for ``ray``
    (:data:`MATRIX_TIMING`) the ranks' operations end 0.8 s apart and 0.3 s later, and the probe,
    the stop and the second set 1.1 s later: its first boundary is at 650 ms
    (``tests/sim/test_engine_procs.py`` holds both clear of the loaded range)."""
    gap, ops_later, probe_later = MATRIX_TIMING[backend]
    later = gap - MATRIX_TIMING["mp"][0] + ops_later + probe_later
    ops = []
    for r in range(dp_size):
        for conn in ("kv", "ec"):
            extra = 0.15 if conn == "ec" else 0.0
            for role in ("worker", "scheduler"):
                ops.append(ConnectorOp(r, conn, role, f"a{r}.{role}.{conn}", 0.25, 0.55 + ops_later + gap * r + extra))
                ops.append(ConnectorOp(r, conn, role, f"b{r}.{role}.{conn}", 1.8 + later, 0.25 + extra))
    return ProcScenario(dp_size=dp_size, step=0.1, busy=((0.2, 0.6),) * dp_size, ops=tuple(ops),
                        duration=2.0 + later, probe_at=1.75 + later, stop_timeout=5.0, margin=0.03,
                        shutdown_delay=0.1)


@dataclass(frozen=True)
class Case:
    signal: str
    phase: str
    rank: int
    at: float = 0.45

    @property
    def name(self) -> str:
        return f"{self.signal}-{self.phase}-rank{self.rank}"

    def plan(self) -> FaultPlan:
        return validate_plan([{"kind": "kill_engine", "at": self.at, "rank": self.rank,
                               "signal": self.signal, "phase": self.phase}], self.name)


def matrix_cases(dp_size: int = 2, signals: Iterable[str] = SIGNALS, phases: Iterable[str] = MATRIX_PHASES,
                 ranks: Iterable[int] | None = None) -> list[Case]:
    ranks = range(dp_size) if ranks is None else ranks
    for p in phases:
        if p not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {p!r}")
    return [Case(s, p, r) for s in signals for p in phases for r in ranks]


def replay_command(case: Case, policy: str, seed: int, backend: str = "mp") -> str:
    return (f"vllm-faultsim procs --signal {case.signal} "
            f"--phase {case.phase} --rank {case.rank} --at {case.at} --policy {policy} --seed {seed} "
            f"--backend {backend}")


# --- the fault matrix ---------------------------------------------------------------------------

@dataclass
class CaseResult:
    case: Case
    seconds: float
    divergences: list[str]
    real: list[dict]
    sim: list[dict]
    unjudged: str | None = None   # why no valid real run was had (a loaded machine): not compared


@dataclass
class MatrixReport:
    backend: str
    policy: str
    seed: int
    cases: list[CaseResult]
    mutants: dict[str, list[str]]   # mutant policy -> the cases (or aggregate checks) that catch it
    latency: dict                   # checkers.procs.compare_latency
    code0_naming: dict              # checkers.procs.compare_code0_naming, the policy against the real runs
    seconds: float

    @property
    def classified_identically(self) -> bool:
        return all(not c.divergences for c in self.cases) and self.code0_naming["ok"]

    @property
    def unjudged(self) -> list[CaseResult]:
        return [c for c in self.cases if c.unjudged]

    def summary(self) -> str:
        lines = [f"fault matrix ({self.backend}, sim policy {self.policy}, seed {self.seed}): "
                 f"{len(self.cases)} cases in {self.seconds:.1f} s, "
                 f"{sum(1 for c in self.cases if not c.divergences and not c.unjudged)} classified identically"
                 + (f", {len(self.unjudged)} unjudged (no valid run: machine loaded)" if self.unjudged else "")]
        c0 = self.code0_naming
        if c0["n"]:
            lines.append(f"  clean exits (code 0) named as failed: real {c0['named']}/{c0['n']}, model rate "
                         f"{c0['model_rate']:.2f} (p={c0['p_value']:.3g}) {'ok' if c0['ok'] else 'INCONSISTENT'}")
        for name, caught in self.mutants.items():
            lines.append(f"  {name}: {'caught in ' + str(len(caught)) + ' case(s)' if caught else 'NOT caught'}")
        for cause, v in self.latency.items():
            lines.append(f"  detection latency ({cause}, n={v['n']}): measured p50 {v['measured_p50'] * 1e3:.1f} ms "
                         f"p90 {v['measured_p90'] * 1e3:.1f} ms p99 {v['measured_p99'] * 1e3:.1f} ms; "
                         f"model p50 {v['model_p50'] * 1e3:.1f} ms ({v['ratio']:.2f}x) {'within' if v['ok'] else 'out of'} +-25% "
                         f"(reported; judged by benchmarks/detection_latency.py)")
        return "\n".join(lines)


EXTRA_EXIT0 = 16  # at most this many extra clean exits when every one in the matrix was named


class MeasuredLatency:
    """A liveness model whose detection latencies are the ones a real run measured, in order (the
    model's own draw once they run out): the matrix's sim side is conditioned on the real run's
    wall-clock latency so that what is compared is what follows from it (who is named, what
    drained, how the engine died), never the latency itself, which a loaded host stretches
    (benchmarks/detection_latency.py judges the latency model)."""

    def __init__(self, model: LatencyModel, measured: Iterable[float]):
        self._model, self._left = model, list(measured)

    def sample(self, rng, backend: str, cause: str, client_rss_mb: float | None = None) -> float:
        if self._left:
            return self._left.pop(0)
        return self._model.sample(rng, backend, cause, client_rss_mb)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def run_fault_matrix(*, dp_size: int = 2, signals: Iterable[str] = SIGNALS,
                     phases: Iterable[str] = MATRIX_PHASES, ranks: Iterable[int] | None = None,
                     backend: str = "mp", policy: str | None = None, seed: int = 0,
                     mutants: Iterable[str] | None = None, out_dir: str | Path | None = None,
                     profile: str | Path | None = None, log: Callable[[str], None] = print) -> MatrixReport:
    """Run ``signal x phase x rank`` for real and in the simulator, compare each pair, check that
    every mutant policy is caught, and compare detection latencies with the model's.

    ``backend`` ``mp`` (CoreEngineProcManager) or ``ray`` (CoreEngineActorManager, inside
    :func:`ray_cluster`); ``policy`` defaults to ``mp-0.26`` / ``ray-actor``; ``mutants``
    defaults to every ``mutant:`` policy for ``mp`` and none for ``ray``; ``out_dir`` keeps both
    traces of every case (``<case>.real.jsonl`` / ``<case>.sim.jsonl``) for offline re-checks;
    ``profile`` is the liveness profile (default: the packaged one). The first divergence is
    logged with the command that replays it. For ``ray`` a local cluster is started (and torn
    down) unless one is already up.
    """
    from ..drivers.real_procs import client_rss_mb, fork_teardown_s, ray_cluster, run_case
    if backend == "ray":
        import ray
        if not ray.is_initialized():
            with ray_cluster():
                return run_fault_matrix(dp_size=dp_size, signals=signals, phases=phases, ranks=ranks,
                                        backend=backend, policy=policy, seed=seed, mutants=mutants,
                                        out_dir=out_dir, profile=profile, log=log)
    policy = policy or ("ray-actor" if backend == "ray" else "mp-0.26")
    mutants = tuple(PROCS_MUTANTS if backend == "mp" else ()) if mutants is None else tuple(mutants)
    sc = replace(matrix_scenario(dp_size, backend), client_rss_mb=client_rss_mb())
    model = LatencyModel.load(profile)
    if backend == "mp" and model.fork_teardown_s:
        model = model.on_host(fork_teardown_s(), sc.client_rss_mb)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    caught: dict[str, list[str]] = {m: [] for m in mutants}
    measured: list[tuple[str, float]] = []
    start = time.perf_counter()
    reported = False
    for case in matrix_cases(dp_size, signals, phases, ranks):
        t = time.perf_counter()
        plan = case.plan()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            real = run_case(sc, plan, seed=seed, backend=backend,
                            trace_path=out / f"{case.name}.real.jsonl" if out is not None else None)
            sim = like_the_run(sc, plan, policy, seed, model, real,
                               trace_path=out / f"{case.name}.sim.jsonl" if out is not None else None)
            why = off_schedule(sc, real) or on_a_boundary(sc, plan, policy, seed, model, real, sim)
            if why is None:
                break
            log(f"{case.name}: the run is no valid history: {why}; "
                f"{'running it again' if attempt < MAX_ATTEMPTS else 'giving up on a valid run'}")
        diffs = fate_differences(sim, real) if why is None else []
        for m in mutants:
            if why is None and fate_differences(like_the_run(sc, plan, m, seed, model, real), real):
                caught[m].append(case.name)
        measured += latencies(real)
        res = CaseResult(case, time.perf_counter() - t, diffs, real, sim, why)
        results.append(res)
        log(f"{case.name:28s} {res.seconds:5.2f} s  {'ok' if not diffs else 'DIVERGES'}"
            + (f" (unjudged: {why})" if why else ""))
        if diffs and not reported:
            reported = True
            for d in diffs:
                log(f"    {d}")
            log(f"    replay: {replay_command(case, policy, seed, backend)}")
            if out is not None:
                log(f"    re-check offline: python -m vllm_faultsim.harness.checkers.procs "
                    f"{out / f'{case.name}.sim.jsonl'} {out / f'{case.name}.real.jsonl'}")
    real_named = code0_naming(r.real for r in results)
    # every clean exit named so far cannot tell 0.26.0's reap race from a policy that always names
    # it: more clean exits (mid-step, ranks alternating), until one is not named or EXTRA_EXIT0 ran
    extra = 0
    while real_named and all(real_named) and extra < EXTRA_EXIT0:
        case = Case("exit0", "mid_step", extra % dp_size, 0.45)
        real_named += code0_naming([run_case(sc, case.plan(), seed=seed, backend=backend)])
        extra += 1
    if extra:
        log(f"clean exits: {extra} more run(s) to tell the reap race from always naming them")
    sim_rate = POLICIES[policy].code0_naming_rate(model.exit0_unreaped)
    for m in mutants:
        rate = PROCS_MUTANTS[m].code0_naming_rate(model.exit0_unreaped)
        if real_named and rate != sim_rate and not compare_code0_naming(real_named, rate)["ok"]:
            caught[m].append("code-0 naming rate")
    report = MatrixReport(backend, policy, seed, results, caught, compare_latency(model, backend, measured, sc.client_rss_mb),
                          compare_code0_naming(real_named, sim_rate), time.perf_counter() - start)
    log(report.summary())
    return report


def add_arguments(ap) -> None:
    ap.add_argument("--signal", choices=SIGNALS, help="one case (default: the whole matrix)")
    ap.add_argument("--phase", choices=MATRIX_PHASES + ("any",), default="mid_step")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--at", type=float, default=0.45)
    ap.add_argument("--dp-size", type=int, default=2)
    ap.add_argument("--backend", choices=("mp", "ray"), default="mp")
    ap.add_argument("--policy", default=None, help=f"sim policy ({', '.join(POLICIES)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the traces in this folder")


def main(args) -> int:
    from ..drivers.real_procs import client_rss_mb, ray_cluster, run_case
    with ray_cluster() if args.backend == "ray" else contextlib.nullcontext():
        if args.signal is None:
            report = run_fault_matrix(dp_size=args.dp_size, backend=args.backend, policy=args.policy,
                                      seed=args.seed, out_dir=args.out)
            return 0 if report.classified_identically and all(report.mutants.values()) else 1
        case = Case(args.signal, args.phase, args.rank, args.at)
        policy = args.policy or ("ray-actor" if args.backend == "ray" else "mp-0.26")
        sc = replace(matrix_scenario(args.dp_size, args.backend), client_rss_mb=client_rss_mb())
        out = Path(args.out) if args.out else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        real = run_case(sc, case.plan(), seed=args.seed, backend=args.backend,
                        trace_path=out / f"{case.name}.real.jsonl" if out else None)
        model = LatencyModel.load()
        sim = like_the_run(sc, case.plan(), policy, args.seed, model, real,
                           trace_path=out / f"{case.name}.sim.jsonl" if out else None)
    why = off_schedule(sc, real) or on_a_boundary(sc, case.plan(), policy, args.seed, model, real, sim)
    diffs = fate_differences(sim, real)
    for d in diffs:
        print(d)
    print(f"{case.name}: " + ("identical classification" if not diffs else f"{len(diffs)} divergence(s)")
          + (f" (no valid history, as the matrix would leave it unjudged: {why})" if why else ""))
    return 1 if diffs else 0


if __name__ == "__main__":  # python -m vllm_faultsim.harness.runs.procs ... = vllm-faultsim procs ...
    from ..cli import main as cli_main
    sys.exit(cli_main(["procs", *sys.argv[1:]]))
