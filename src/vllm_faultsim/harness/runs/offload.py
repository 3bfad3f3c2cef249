"""KV offloading's differential runs: the generated cases and upstream's scenarios, each run
through the engine loop (models/engine.py) on the real vLLM Scheduler + OffloadingConnector, the
real Scheduler with the model's connector, or the pure simulator, and judged by the checker
(harness/checkers/offload.py).

Every case runs in either scheduling mode (``OffloadSchedConfig.async_scheduling``; vLLM 0.26.0's
default is async: ``AsyncScheduler`` and the engine loop's batch queue of 2, on both sides).

``run_offload`` steps a core with a KV connector as the engine loop does for every run: while the
core ``has_requests()`` (vLLM's ``Scheduler.has_requests()``: unfinished requests, finished ids not
yet reported and, with 0.24+, ``has_pending_push_work``) it schedules, runs the step (an empty step
takes ``IDLE_STEP``: the 1 ms sleep of ``EngineCore`` plus a no-forward pass; a step whose worker
waits on flushed jobs takes that much longer) and applies the output -- empty steps included,
since that is where the worker reports completions. A ``kill_engine`` fault or a failed transfer
(``TransferFailed``) kills it; the ``end`` event it adds names what the checker judges: the jobs
still pending, or the death, the jobs it lost and the requests that failed.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import simpy

from ...faults.plan import FaultPlan, validate_plan
from ...faults.sim_injector import SimInjector
from ...models import events as ev
from ...models import kv_offload as ko
from ...models.engine import EngineCore
from ...models.step_time import LinearStepTime
from ..checkers.offload import invariants, kv_summary, offload_differences
from ..invariants import Invariants
from ..mutants import OFFLOAD_MUTANTS, offload_policy
from ..trace import Trace
from ..workload import RequestSpec, validate

STEP_TIME = LinearStepTime(base=0.008, prefill_token=4e-05, decode_req=0.0001, context_token=5e-08, name="offload")


def run_offload(core, specs, *, plan: FaultPlan | None = None, limits: Invariants | None = None) -> list[dict]:
    """Drive `core` over `specs` through the engine loop under `plan`; returns the trace events
    (step, req, fault, proc, kv_lost) and the ``end`` event: ``steps``, ``async_scheduling``, then
    ``pending`` (the connector's jobs not retired) or, after a death, ``dead`` (its cause), ``lost``
    (the jobs in flight) and ``failed_requests``. ``limits``: the per-step invariants (harness/invariants.py)."""
    env = simpy.Environment()
    trace = Trace()
    out = trace.events
    engine = EngineCore(env, core, specs, STEP_TIME, trace.emit, invariants=limits,
                        max_concurrent_batches=2 if core.async_scheduling else 1)
    SimInjector(plan).arm_engine(engine)
    env.run()
    end: dict = {"steps": engine.stats.steps, "async_scheduling": core.async_scheduling}
    if engine.alive:
        end["pending"] = core.pending_jobs()
    else:
        lost = next((e for e in out if e["kind"] == "kv_lost"), {"cause": "engine_dead", "jobs": []})
        end["dead"], end["lost"] = lost["cause"], lost["jobs"]
        end["failed_requests"] = sorted(e["req"] for e in out if e["kind"] == "req" and e["status"] in ("failed", "aborted"))
    trace.emit(ev.end(env.now, **end))
    return out


# ---- generated cases ---------------------------------------------------------------------------

@dataclass
class Case:
    seed: int
    sched: object
    offload: ko.OffloadConfig
    specs: tuple[RequestSpec, ...]
    plan: FaultPlan = field(default_factory=FaultPlan)

    def describe(self) -> str:
        return (f"seed={self.seed} {'async' if self.sched.async_scheduling else 'sync'} "
                f"gpu_blocks={self.sched.num_gpu_blocks} cpu_chunks={self.offload.num_cpu_chunks} "
                f"bpc={self.offload.blocks_per_chunk} reqs={len(self.specs)} faults={len(self.plan.faults)}")

    def in_mode(self, async_scheduling: bool) -> "Case":
        """The same case under the other scheduling mode (or this one)."""
        return dataclasses.replace(self, sched=dataclasses.replace(self.sched, async_scheduling=async_scheduling))


def gen_case(seed: int, *, faults: bool = True, async_scheduling: bool = True) -> Case:
    """A small random case: few GPU blocks (preemption storms), a small CPU pool (evictions,
    nostore), shared prefixes and repeats (CPU hits, loads, delayed lookups), slow transfers;
    the same case in either scheduling mode."""
    from ..drivers.real_offload import OffloadSchedConfig  # a plain dataclass; importing it does not import vLLM
    rng = random.Random(seed)
    bs = rng.choice([4, 8, 16])
    bpc = rng.choice([1, 1, 2])
    n = rng.randint(2, 9)
    max_prompt = rng.choice([4, 8, 12]) * bs
    groups = [rng.randint(1, max_prompt // bs) * bs + rng.choice([0, 0, rng.randrange(bs)]) for _ in range(3)]
    specs = []
    t = 0.0
    for k in range(n):
        t += rng.choice([0.0, 0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.3)])
        out = rng.randint(1, 3 * bs)
        stop = rng.randint(1, out) if rng.random() < 0.2 else None
        if rng.random() < 0.7:  # shares a group prefix; with no extra tokens, a repeat of the group's prompt
            g = rng.randrange(len(groups))
            plen = groups[g] + rng.choice([0, 0, rng.randint(1, 2 * bs)])
            prefix = (g, groups[g])
        else:
            plen, prefix = rng.randint(max(1, bs // 2), max_prompt), None
        specs.append(RequestSpec(f"r{k}", round(t, 6), plen, out, prefix=prefix, stop_at=stop))
    need = max(s.prompt_len + s.output_len for s in specs)
    min_blocks = -(-need // bs) + 2
    num_gpu_blocks = rng.randint(min_blocks, min_blocks + rng.choice([0, 4, 16, 64]))
    sched = OffloadSchedConfig(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([32, 64, 256]),
                               block_size=bs, num_gpu_blocks=num_gpu_blocks, max_model_len=2048)
    if sched.max_num_batched_tokens < bs:
        sched = OffloadSchedConfig(sched.max_num_seqs, bs * 4, bs, num_gpu_blocks, 2048)
    cpu = rng.choice([2, 4, 8, 32, 256])
    offload = ko.OffloadConfig(block_size=bs, blocks_per_chunk=bpc, num_cpu_chunks=cpu,
                               offload_prompt_only=rng.random() < 0.8,
                               bytes_per_block=rng.choice([1 << 20, 2 << 20, 8 << 20]),
                               bandwidth=rng.choice([2e9, 25e9, 100e9]), latency=rng.choice([0.0, 50e-6, 0.002]))
    plan_faults = []
    if faults and rng.random() < 0.4:
        s0 = round(rng.uniform(0, 0.3), 3)
        plan_faults.append({"kind": "kv_transfer_slow", "start": s0, "end": round(s0 + rng.uniform(0.01, 0.5), 3),
                            "factor": rng.choice([5, 50, 1000])})
    if faults and rng.random() < 0.1:
        s0 = round(rng.uniform(0, 0.2), 3)
        plan_faults.append({"kind": "kv_transfer_fail", "start": s0, "end": round(s0 + rng.uniform(0.001, 0.1), 3)})
    if faults and rng.random() < 0.1:
        plan_faults.append({"kind": "kill_engine", "at": round(rng.uniform(0.005, 0.3), 3)})
    plan = validate_plan({"version": 1, "faults": plan_faults}, f"case-{seed}")
    return Case(seed, sched, offload, validate(specs), plan).in_mode(async_scheduling)


# ---- upstream's scenarios --------------------------------------------------------------------

# 2 MiB blocks at 100 MB/s: ~21 ms per block, slower than a step, so jobs are in flight when it matters
_SLOW = dict(block_size=4, num_cpu_chunks=64, bandwidth=1e8, bytes_per_block=2 << 20)


def scenario(name: str, async_scheduling: bool = True) -> Case:
    """Upstream's offloading-connector scenarios (tests/v1/kv_connector/unit/offloading_connector),
    as workloads for both sides:

    - ``preemption``: two 16-token prompts decode until the 12-block GPU pool runs out; r1 is
      preempted while its store job is in flight -> that job is flushed in the preemption step.
    - ``fence``: r0 and r1 finish with store jobs in flight; r2 then gets their freed GPU blocks
      -> the pending jobs of those blocks are flushed in the step that re-allocates them.
    - ``last_step``: one request finishes with its store in flight. 0.23.0 (PR #42611): the next
      step, where every tracked request is finished, flushes all jobs and the engine stops;
      0.24+: no flush, the engine keeps stepping (has_pending_push_work) until the store completes.
    """
    from ..drivers.real_offload import OffloadSchedConfig
    if name == "preemption":
        sched = OffloadSchedConfig(block_size=4, num_gpu_blocks=12, max_num_batched_tokens=64)
        specs = [RequestSpec("r0", 0.0, 16, 16), RequestSpec("r1", 0.0, 16, 16)]
    elif name == "fence":
        sched = OffloadSchedConfig(block_size=4, num_gpu_blocks=8)
        specs = [RequestSpec("r0", 0.0, 12, 1), RequestSpec("r1", 0.0, 12, 2), RequestSpec("r2", 0.009, 16, 2)]
    elif name == "last_step":
        sched = OffloadSchedConfig(block_size=4, num_gpu_blocks=32)
        specs = [RequestSpec("r0", 0.0, 8, 1)]
    else:
        raise ValueError(f"unknown scenario {name!r} (known: preemption, fence, last_step)")
    return Case(0, sched, ko.OffloadConfig(**_SLOW), validate(specs)).in_mode(async_scheduling)


SCENARIOS = ("preemption", "fence", "last_step")


# ---- differential runs -----------------------------------------------------------------------

def sim_core(case: Case, *, policy: str | None = None, mutant: str | None = None):
    """The pure simulator: the simulated Scheduler (prefix caching) with the offloading hooks, under
    the scheduling rules of the installed vLLM release (``for_release``; `policy` picks only the
    offloading rules)."""
    from ...models.offload_scheduler import OffloadScheduler
    from ...models.scheduler import SchedulerConfig, for_release
    s = case.sched
    cfg = SchedulerConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                          block_size=s.block_size, num_gpu_blocks=s.num_gpu_blocks, max_model_len=s.max_model_len,
                          enable_prefix_caching=True, async_scheduling=s.async_scheduling)
    core = for_release(OffloadScheduler, ko.installed_vllm_version())(
        cfg, case.offload, offload_policy(ko.policy_for(policy).version, mutant))
    SimInjector(case.plan).arm_transfers(core.transfers)
    return core


def run_case(case: Case, connector: str, *, policy: str | None = None, mutant: str | None = None) -> list[dict]:
    """One side of a case: the real Scheduler with vLLM's OffloadingConnector (``"real"``), the
    real Scheduler with the simulator's model (``"sim"``), or the pure simulator (``"puresim"``:
    simulated Scheduler + model, no vLLM), the last two under `policy`/`mutant`."""
    limits = Invariants(case.sched.max_num_batched_tokens, case.sched.max_num_seqs)
    if connector == "puresim":
        return run_offload(sim_core(case, policy=policy, mutant=mutant), case.specs, plan=case.plan, limits=limits)
    from ..drivers.real_offload import RealOffloadCore
    kw = dict(policy=policy, mutant=mutant) if connector == "sim" else {}
    core = RealOffloadCore(case.sched, case.offload, connector=connector, plan=case.plan, **kw)
    return run_offload(core, case.specs, plan=case.plan, limits=limits)


def check_case(case: Case, *, policy: str | None = None, mutant: str | None = None, side: str = "sim",
               real: list[dict] | None = None) -> list[str]:
    """Divergences (real vs `side`: "sim" or "puresim") plus invariant violations of either side;
    [] when all is well."""
    real = run_case(case, "real") if real is None else real
    sim = run_case(case, side, policy=policy, mutant=mutant)
    tpc = case.offload.tokens_per_chunk
    return (offload_differences(real, sim) + [f"real: {v}" for v in invariants(real, case.specs, tpc)]
            + [f"sim: {v}" for v in invariants(sim, case.specs, tpc)])


def replay_command(seed: int, policy: str | None = None, mutant: str | None = None, side: str = "sim",
                   async_scheduling: bool = True) -> str:
    extra = (f" --policy {policy}" if policy else "") + (f" --mutant {mutant}" if mutant else "")
    extra += f" --side {side}" if side != "sim" else ""
    extra += "" if async_scheduling else " --async no"
    return f"PYTHONPATH=src python -m vllm_faultsim.harness.runs.offload --seed {seed}{extra}"


def main(argv=None) -> int:
    import argparse
    import json
    import logging
    ap = argparse.ArgumentParser(description="Replay one generated KV-offload case (real vs sim) or a scenario.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenario", choices=SCENARIOS)
    ap.add_argument("--policy", choices=ko.VERSIONS)
    ap.add_argument("--mutant", choices=list(OFFLOAD_MUTANTS))
    ap.add_argument("--side", choices=("sim", "puresim"), default="sim",
                    help="sim: the model inside the real Scheduler; puresim: the simulated Scheduler")
    ap.add_argument("--async", dest="async_", choices=("yes", "no"), default="yes",
                    help="scheduling mode (yes: vLLM 0.26.0's default, AsyncScheduler + the batch queue)")
    ap.add_argument("--trace", action="store_true", help="print both traces' steps with KV events")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    mode = args.async_ == "yes"
    case = scenario(args.scenario, mode) if args.scenario else gen_case(args.seed, async_scheduling=mode)
    print(case.describe())
    real, sim = run_case(case, "real"), run_case(case, args.side, policy=args.policy, mutant=args.mutant)
    if args.trace:
        for side, evs in (("real", real), ("sim", sim)):
            for e in evs:
                if e["kind"] != "step" or e.get("kv") or e.get("preempted") or e.get("finished"):
                    print(side, json.dumps(e))
    problems = offload_differences(real, sim) + [f"real: {v}" for v in invariants(real, case.specs, case.offload.tokens_per_chunk)] \
        + [f"sim: {v}" for v in invariants(sim, case.specs, case.offload.tokens_per_chunk)]
    print("\n".join(problems) if problems else "no divergence, invariants hold")
    print("summary:", kv_summary(real))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
