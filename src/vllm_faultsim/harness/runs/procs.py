"""The engine-process fault matrix: each case run for real (drivers/real_procs.py) and in the model
(models/engine_procs.py), compared by the checker (checkers/procs.py); mutants judged. The sim side of
each case takes the detection latency the real run measured (:class:`MeasuredLatency`): classifications
are compared, latencies only reported (benchmarks/detection_latency.py judges them)."""

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
from ..checkers.procs import (MATRIX_PHASES, code0_naming, compare_code0_naming, compare_latency, fate_differences,
                              latencies)
from ..mutants import PROCS_MUTANTS
from ..trace import Trace, header

MAX_ATTEMPTS = 3    # a real run more than SLIP_LIMIT late against its schedule is run again up to this many times
SLIP_LIMIT = 0.03
# The matrix scenario's boundaries are >= 40 ms apart, laid out for this host's idle detection latency
# (15-45 ms) and the client seeing the engine dead soon after the last exit. A loaded host stretches both
# (130-250 ms measured with both cores busy): such a run crosses boundaries the scenario assumes it does
# not, so it is no valid history for the case (like a slipped one): run again, then left unjudged.
DETECT_BUDGET = 0.06     # exit -> the monitor starts the shutdown
DEAD_BUDGET = 0.15       # the last exit -> the client marks the engine dead


def off_schedule(real: list[dict]) -> str | None:
    """Why a real matrix run is no valid history for its case (None: it is): it slipped behind its
    schedule, or its detection or death notice took longer than the scenario leaves room for."""
    slip = real[-1]["max_slip"]
    if slip > SLIP_LIMIT:
        return f"slipped {slip * 1e3:.0f} ms behind its schedule"
    for _, x in latencies(real):
        if x > DETECT_BUDGET:
            return f"detection took {x * 1e3:.0f} ms (the scenario leaves {DETECT_BUDGET * 1e3:.0f} ms)"
    exits = [e["t"] for e in real if e.get("kind") == "proc" and e["event"] == "exit" and e["t"] is not None]
    dead = [e["t"] for e in real if e.get("kind") == "proc" and e["event"] == "engine_dead"]
    if exits and dead and dead[0] - max(exits) > DEAD_BUDGET:
        return (f"the engine was seen dead {(dead[0] - max(exits)) * 1e3:.0f} ms after the last exit "
                f"(the scenario leaves {DEAD_BUDGET * 1e3:.0f} ms)")
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


def matrix_scenario(dp_size: int = 2) -> ProcScenario:
    """The matrix's scenario: every rank steps in [0.2, 0.6) (faults at 0.45: mid-step at 0.45,
    idle at 0.63); each rank has one operation per connector and role pending over the fault
    (KV ones end 0.15 s before EC ones, ranks 0.3 s apart, so an EC connector whose shutdown is
    skipped loses them), and another set pending over the end-of-run stop at 1.7 s (KV ends at
    1.75, drained before a shutdown-phase fault at ~1.8; EC at 1.9, lost to it). Every boundary
    is >= 40 ms from the next event, well above this driver's jitter."""
    ops = []
    for r in range(dp_size):
        for conn in ("kv", "ec"):
            extra = 0.15 if conn == "ec" else 0.0
            for role in ("worker", "scheduler"):
                ops.append(ConnectorOp(r, conn, role, f"a{r}.{role}.{conn}", 0.25, 0.55 + 0.3 * r + extra))
                ops.append(ConnectorOp(r, conn, role, f"b{r}.{role}.{conn}", 1.5, 0.25 + extra))
    return ProcScenario(dp_size=dp_size, step=0.1, busy=((0.2, 0.6),) * dp_size, ops=tuple(ops),
                        duration=1.7, probe_at=1.45, stop_timeout=5.0, margin=0.03, shutdown_delay=0.1)


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
    sc = replace(matrix_scenario(dp_size), client_rss_mb=client_rss_mb())
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
            why = off_schedule(real)
            if why is None:
                break
            log(f"{case.name}: the run {why} (machine stalled); "
                f"{'running it again' if attempt < MAX_ATTEMPTS else 'giving up on a valid run'}")
        seen = [x for _, x in latencies(real)]
        sim = simulate_procs(sc, plan, policy, seed=seed, latency=MeasuredLatency(model, seen),
                             trace_path=out / f"{case.name}.sim.jsonl" if out is not None else None)
        diffs = fate_differences(sim, real) if why is None else []
        for m in mutants:
            if why is None and fate_differences(simulate_procs(sc, plan, m, seed=seed, latency=MeasuredLatency(model, seen)), real):
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
        sc = replace(matrix_scenario(args.dp_size), client_rss_mb=client_rss_mb())
        out = Path(args.out) if args.out else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        real = run_case(sc, case.plan(), seed=args.seed, backend=args.backend,
                        trace_path=out / f"{case.name}.real.jsonl" if out else None)
        sim = simulate_procs(sc, case.plan(), policy, seed=args.seed,
                       trace_path=out / f"{case.name}.sim.jsonl" if out else None)
    diffs = fate_differences(sim, real)
    for d in diffs:
        print(d)
    print(f"{case.name}: " + ("identical classification" if not diffs else f"{len(diffs)} divergence(s)"))
    return 1 if diffs else 0


if __name__ == "__main__":  # python -m vllm_faultsim.harness.runs.procs ... = vllm-faultsim procs ...
    from ..cli import main as cli_main
    sys.exit(cli_main(["procs", *sys.argv[1:]]))
