"""The simulator against the real scheduler, on the same trace, in one run (target: simulator >= 50x).

One workload (Poisson 20 req/s, 512-token prompts, 128-token outputs, max_num_seqs 256, default
600 s of traffic) goes through the same engine loop (``harness.runs.simulate.run_engine``: SimPy clock,
step-time model, per-step invariants, full JSONL trace written) twice: with the simulated
scheduler core, as ``simulate()`` builds it, and with ``RealSchedulerCore`` (vLLM 0.26.0's own
v1 ``Scheduler`` on CPU, text-only). The two traces must be identical but for the header's side,
so both sides did the same work (the simulator with macro-steps, models/engine.py, as it runs by
default; the real core has none and is stepped one step at a time). The simulator runs before the real scheduler (before vLLM is
imported, as it runs without it) and again after it; the ratio is the real wall time over the
mean of the two simulator runs (load drift on a shared machine hits both sides alike), with the
same ratio of CPU times beside it. Those two simulator runs call the core directly; a third, through
the timing wrapper below, gives the simulator's breakdown (the wrapper costs the simulator ~5 us a
step, 7%; the real side, timed in its one run, pays the same calls: ~0.5% of its time).
Each side's wall time is split into the scheduler core's own calls (add_request, schedule,
update_from_output; the simulator's decode_run and advance_decode), the core's internal invariant
check (sim only: ``check()``) and the rest
(engine loop, step-time model, trace, the loop's invariants, the timing wrapper itself).
``--prefix-caching on`` runs both sides with vLLM 0.26.0's default prefix caching (the real side
hashes blocks with its own block hasher, sha256).

    python benchmarks/sim_vs_real_speed.py [--duration 600] [--out FILE]      # ~1.5 min on 2 cores
    python benchmarks/sim_vs_real_speed.py --duration 3600                      # the 1-hour trace, ~4 min
    python benchmarks/sim_vs_real_speed.py --step-time aic --out benchmarks/results/sim_vs_real_speed_aic.json
    python benchmarks/sim_vs_real_speed.py --prefix-caching on --out benchmarks/results/sim_vs_real_speed_caching.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from vllm_faultsim.faults.plan import FaultPlan
from vllm_faultsim.harness.checkers.divergence import first_divergence
from vllm_faultsim.harness.runs.simulate import RunConfig, build_workload, run_engine, with_scheduler
from vllm_faultsim.harness.trace import iter_jsonl
from vllm_faultsim.models.ec_connector import ECConnector, PrefetchSchedule
from vllm_faultsim.models.scheduler import Scheduler
from vllm_faultsim.models.step_time import check_section, from_config

CORE_CALLS = ("add_request", "schedule", "update_from_output", "decode_run", "advance_decode")
AIC = {"backend": "aic", "model": "meta-llama/Meta-Llama-3.1-8B", "system": "h200_sxm"}


class TimedCore:
    """A scheduler core forwarded call for call, timing the protocol calls and ``check()``."""

    def __init__(self, core):
        self.core = core
        self.seconds = dict.fromkeys((*CORE_CALLS, "check"), 0.0)
        for name in CORE_CALLS + ("check",):
            if hasattr(core, name):
                setattr(self, name, self._timed(name, getattr(core, name)))

    def _timed(self, name, fn):
        seconds, clock = self.seconds, time.perf_counter

        def call(*args):
            t0 = clock()
            out = fn(*args)
            seconds[name] += clock() - t0
            return out
        return call

    @property
    def lazy_decodes(self) -> bool:
        return self.core.lazy_decodes

    @lazy_decodes.setter
    def lazy_decodes(self, on: bool) -> None:  # the engine turns the core's decode cohort on (macro-steps)
        self.core.lazy_decodes = on

    def __getattr__(self, name):  # the other methods, bound once
        value = getattr(self.core, name)
        if callable(value):
            setattr(self, name, value)
        return value


def build_core(side: str, cfg: RunConfig, specs):
    """(core, prefetch schedule): the simulated core as ``simulate()`` builds it, or the real one."""
    prefetch = PrefetchSchedule(specs)
    if side == "sim":
        return Scheduler(cfg.scheduler, ECConnector(prefetch, cfg.ec_policy)), prefetch
    from vllm_faultsim.harness.drivers.real_scheduler import RealSchedulerCore
    return RealSchedulerCore(cfg.scheduler, multimodal=False), None


def run_side(side: str, cfg: RunConfig, specs, trace: Path, *, timed: bool = True) -> dict:
    """One side through the engine loop, its trace written to `trace`; times and (timed: through
    the wrapper) their breakdown."""
    t0 = time.perf_counter()
    core, prefetch = build_core(side, cfg, specs)
    wrapped = TimedCore(core) if timed else core
    t1, c1 = time.perf_counter(), time.process_time()
    res = run_engine(wrapped, specs, cfg, FaultPlan(), side=side, trace_path=trace, keep=False, prefetch=prefetch)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    steps = res.summary["steps"]
    out = {"setup_s": round(t1 - t0, 2), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "steps": steps,
           "steps_per_s": round(steps / wall), "us_per_step": round(1e6 * wall / steps, 1),
           "us_per_step_cpu": round(1e6 * cpu / steps, 1)}
    if not timed:
        return out
    seconds = wrapped.seconds
    core_s = sum(seconds[c] for c in CORE_CALLS)
    return {
        **out,
        "breakdown_s": {"core": round(core_s, 3), **{c: round(seconds[c], 3) for c in CORE_CALLS},
                        "core_check": round(seconds["check"], 3),
                        "loop_trace_invariants": round(wall - core_s - seconds["check"], 3)},
    }


def same_trace(a: Path, b: Path) -> str | None:
    """None when the traces are identical but for the header (the side); else the divergence."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.readline(), fb.readline()
        while True:
            la, lb = fa.readline(), fb.readline()
            if la != lb:
                break
            if not la:
                return None
    div = first_divergence(list(iter_jsonl(a)), list(iter_jsonl(b)))
    return div.explain() if div else f"traces differ in bytes:\n  sim:  {la[:200]!r}\n  real: {lb[:200]!r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_vs_real_speed.json"))
    ap.add_argument("--step-time", choices=("linear", "aic"), default="linear",
                    help="linear: the default profile; aic: aiconfigurator-core, Llama-3.1-8B on an H200")
    ap.add_argument("--prefix-caching", choices=("on", "off"), default="off",
                    help="on: vLLM 0.26.0's default (both sides hash and cache blocks)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    cfg = with_scheduler(RunConfig(workload={"kind": "poisson", "rate": 20.0, "duration": args.duration,
                                             "prompt": 512, "output": 128}), max_num_seqs=256,
                         enable_prefix_caching=args.prefix_caching == "on")
    if args.step_time == "aic":
        cfg = replace(cfg, step_time=check_section(AIC))
    from_config(cfg.step_time)  # built (and loaded) before the clock starts
    specs = build_workload(cfg)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (side, timed) in enumerate((("sim", False), ("real", True), ("sim", False), ("sim", True))):
            trace = Path(tmp) / f"{i}-{side}.jsonl"
            runs.append((side, trace, run_side(side, cfg, specs, trace, timed=timed)))
            r = runs[-1][2]
            print(f"{side:>4}{' (timed)' if timed else ''}: {r['steps']} steps in {r['wall_s']} s wall, "
                  f"{r['cpu_s']} s CPU ({r['steps_per_s']} steps/s)", flush=True)
        trace_mib = round(runs[0][1].stat().st_size / 2**20, 1)
        problem = next(filter(None, (same_trace(runs[i][1], runs[1][1]) for i in (0, 2, 3))), None)
    if problem:
        raise SystemExit(f"the two sides made different decisions, the comparison is void:\n{problem}")
    sims, real, sim_timed = [runs[0][2], runs[2][2]], runs[1][2], runs[3][2]
    sim_wall, sim_cpu = (sum(r[k] for r in sims) / 2 for k in ("wall_s", "cpu_s"))
    out = {
        "benchmark": "sim_vs_real_speed",
        "workload": {**cfg.workload, "requests": len(specs), "max_num_seqs": cfg.scheduler.max_num_seqs},
        "identical_traces": True, "trace_mib": trace_mib,
        "sim_before_real": sims[0], "real": real, "sim_after_real": sims[1], "sim_timed": sim_timed,
        "sim_steps_per_s": round(real["steps"] / sim_wall), "real_steps_per_s": real["steps_per_s"],
        "ratio": round(real["wall_s"] / sim_wall, 2),
        "ratio_cpu": round(real["cpu_s"] / sim_cpu, 2),
        "ratio_core_only": round(real["breakdown_s"]["core"] / sim_timed["breakdown_s"]["core"], 2),
        "prefix_caching": cfg.scheduler.enable_prefix_caching,
        "step_time": cfg.step_time or {"profile": cfg.profile},
        "target_ratio": 50.0, "meets_target": real["wall_s"] >= 50 * sim_wall,
        "host": {"machine": platform.machine(), "cpus_allowed": len(os.sched_getaffinity(0)),
                 "python": platform.python_version(), "vllm": _vllm_version(), "loadavg_before": load_before,
                 "loadavg_after": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _vllm_version() -> str:
    import vllm
    return vllm.__version__


if __name__ == "__main__":
    main()
