"""The EPLB check's runs: the model run like a real run, the link calibrated, the whole check (CPU diff tier and GPU tier)."""

from __future__ import annotations

import statistics

import simpy

from ...faults.plan import validate_plan
from ...faults.sim_injector import SimInjector
from ...models import eplb as me
from ...models import events
from ...models.engine import EngineCore
from ...models.step import StepResult
from ..checkers.eplb import Tolerance, _cycles, _rank_events, judge_run, real_events
from ..mutants import EPLB_MUTANTS


# ---- the engine loop as the real driver runs it ------------------------------------------------

class _Recorded:
    """Mixed into an ``EplbState``: also records each ``step()`` call (``step``) and the call that
    raises (``step_error``), as the real driver records them."""

    def step(self, step_index: int) -> float:
        self.emit(events.eplb("step", step=step_index, t=events.t(self.env.now)))
        try:
            return super().step(step_index)
        except me.EplbRankDeath:
            self.emit(events.eplb("step_error", step=step_index, t=events.t(self.env.now)))
            raise


class _ForwardOnly:
    """The scheduler core of the real EPLB driver's main loop: one forward pass a step, no
    requests, until ``cycles`` rearrangements are consumed and ``extra_steps`` more steps ran, or
    the next ``EplbState.step()`` would start one rearrangement more."""

    def __init__(self, state: me.EplbState, cycles: int, extra_steps: int, max_steps: int):
        self.state, self.cycles, self.extra_steps, self.max_steps = state, cycles, extra_steps, max_steps
        self.consumed_last = 0   # consumptions of the last layer so far (one per rearrangement)
        self.steps = 0
        self.done_at: int | None = None
        self.over = False

    def has_unfinished_requests(self) -> bool:
        st = self.state
        if self.done_at is not None and st.expert_rearrangement_step + 1 >= st.cfg.step_interval:
            self.over = True  # the next step() would start one rearrangement more
        return not self.over and self.steps < self.max_steps

    def schedule(self, now: float) -> StepResult:
        return StepResult(sched={"forward": 1}, computed_before={"forward": 0}, prompt_len={"forward": 1})

    def update_from_output(self, res: StepResult, now: float) -> list:
        s = self.steps
        self.steps += 1
        if self.done_at is None and self.consumed_last == self.cycles:
            self.done_at = s
        if self.done_at is not None and s >= self.done_at + self.extra_steps:
            self.over = True
        return []

    def count_consume(self, ev: dict) -> None:
        if ev.get("event") == "consume" and ev["layer"] == self.state.cfg.layers - 1:
            self.consumed_last += 1

    def fail_all(self) -> list[str]:
        return []

    def counts(self) -> tuple[int, int]:
        return 0, 0


def simulate_main_loop(cfg: me.EplbConfig, policy, *, forward_s: float, cycles: int, extra_steps: int,
                       plan=None, max_steps: int = 100_000, state_cls: type[me.EplbState] = me.EplbState) -> list[dict]:
    """The engine loop (models/engine.py) reduced to what EPLB sees, as the real driver runs it: a
    forward of ``forward_s``, then ``EplbState.step()``, until ``cycles`` rearrangements are done
    and ``extra_steps`` more ran (or the next step would rearrange again), or the step raises.
    Returns the ``eplb`` trace events, with a ``step`` event at each ``EplbState.step()`` call.
    ``state_cls``: the ``EplbState`` (or a mutant of it, harness/mutants.py)."""
    env = simpy.Environment()
    out: list[dict] = []
    core: _ForwardOnly | None = None

    def emit(ev: dict) -> None:
        if ev["kind"] == "eplb":
            out.append(ev)
            core.count_consume(ev)

    state = type("RecordedEplbState", (_Recorded, state_cls), {})(env, cfg, policy, emit)
    core = _ForwardOnly(state, cycles, extra_steps, max_steps)
    injector = SimInjector(plan)
    injector.arm_eplb(state)
    engine = EngineCore(env, core, (), lambda *shape: forward_s, emit, eplb=state, full_trace=False)
    injector.arm_engine(engine)
    env.run(until=engine.process)
    return out

# ---- the model for a real run; calibration -----------------------------------------------------

def model_config(result: dict, link: me.EplbLink, *, step_sync: float = 0.0) -> me.EplbConfig:
    c = result["config"]
    sh = c["shape"]
    return me.EplbConfig(layers=sh["layers"], logical_experts=sh["logical"], redundant_experts=sh["redundant"],
                         ep_size=c["world"], expert_bytes=sh["expert_bytes"], step_interval=c["step_interval"],
                         link=link, step_sync=step_sync, publish_bandwidth=1e18, contention=0.0)


def replay_policy(result: dict):
    """The model's placement: the maps the real worker published, rearrangement by rearrangement."""
    rows = [e["new_map"] for e in _rank_events(result["ranks"][0], "publish")]
    layers = result["config"]["shape"]["layers"]

    def policy(cycle: int, old: list[list[int]]) -> list[list[int]]:
        got = rows[cycle * layers:(cycle + 1) * layers]
        return got + old[len(got):]
    return policy


def forward_s(result: dict) -> float:
    return statistics.median(e["forward_end"] - e["t"] for e in _rank_events(result["ranks"][0], "step"))


def simulate_like(result: dict, link: me.EplbLink, *, step_sync: float, mutant: str | None = None,
                  plan=None) -> list[dict]:
    """The model run the way the real driver ran: same shape, maps, interval, forward, faults (the
    run's own plan unless ``plan`` is given); ``mutant`` names a broken twin of harness/mutants.py."""
    c = result["config"]
    cfg = model_config(result, link, step_sync=step_sync)
    if plan is None:
        plan = validate_plan(c["plan"], "the real run's plan")
    return simulate_main_loop(cfg, replay_policy(result), forward_s=forward_s(result), cycles=c["cycles"],
                              extra_steps=c["extra_steps"], plan=plan,
                              state_cls=EPLB_MUTANTS[mutant] if mutant else me.EplbState)


def slow_link_factor(result: dict) -> float:
    """The real run's slow-link factor (1: none)."""
    return next((f["factor"] for f in result["config"]["plan"]["faults"] if f["kind"] == "slow_link"), 1.0)


def _moved(ev: dict, expert_bytes: int) -> int:
    return max(s + r for s, r in zip(ev["sent"], ev["recv"])) * expert_bytes


def calibrate(results: list[dict]) -> tuple[me.EplbLink, float]:
    """Fit the link (and the per-step all_reduce) to real runs of one host and backend:
    ``latency`` + ``bandwidth`` by least squares of transfer time on moved bytes (each worker's
    first transfer left out), ``setup`` the median excess of those first transfers, ``gap`` the median consume ->
    next transfer start, ``rebalance`` the median rearrange -> first transfer start less ``gap``,
    ``step_sync`` the median ``EplbState.step()`` time of steps that consumed nothing."""
    pts, firsts, gaps, rebal, syncs = [], [], [], [], []
    for res in results:
        eb = res["config"]["shape"]["expert_bytes"]
        ev = real_events(res)
        trs = [e for e in ev if e["event"] == "transfer"]
        for i, tr in enumerate(trs):
            (firsts if i == 0 else pts).append((_moved(tr, eb), tr["dur"]))
        for cyc in _cycles(ev, 0):
            gaps += [tr["t"] - c["t"] for tr, c in zip(cyc["transfer"][1:], cyc["consume"])]
        for e in ev:
            if e["event"] == "rearrange":
                nxt = next((x for x in ev if x["event"] == "transfer" and x["t"] > e["t"]), None)
                if nxt:
                    rebal.append(nxt["t"] - e["t"])
        consumed = {c["step"] for c in ev if c["event"] == "consume"}
        syncs += [s["end"] - s["forward_end"] for s in _rank_events(res["ranks"][0], "step") if s["step"] not in consumed]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    slope = max(slope, 1e-15)
    latency = max(0.0, my - slope * mx)
    gap = max(0.0, statistics.median(gaps))  # a starved host can record the next transfer before the consume
    link = me.EplbLink(latency=latency, bandwidth=1.0 / slope, gap=gap,
                       rebalance=max(0.0, statistics.median(rebal) - gap),
                       setup=max(0.0, statistics.median(y - latency - slope * x for x, y in firsts)))
    return link, statistics.median(syncs)


# ---- the whole check (CPU diff tier and GPU tier) --------------------------------------------------

def death_outcome(result: dict) -> dict:
    """What the survivors of a rank death did (from their own records): error, where, when."""
    death = result["death"]
    out: dict = {"died": death, "exit_codes": result["exit_codes"], "survivors": []}
    for r in result["ranks"]:
        if r is None:
            continue
        t_death = death["t"] - r["t0"] if death else None
        errs = [{"thread": e["kind"].split("_")[0], "step": e.get("step"), "error": e["error"],
                 "after_death_ms": round(1e3 * (e["t"] - t_death), 1) if t_death is not None else None}
                for e in r["events"] if e["kind"] in ("main_error", "worker_error")]
        out["survivors"].append({"rank": r["rank"], "errors": errs, "worker_alive": r.get("worker_alive")})
    return out


def run_check(device: str, out_dir, *, hidden: tuple[int, ...], forward_s: float, tol: Tolerance,
              communicator: str = "torch_gloo", slow_factor: float = 4.0, slow_min_s: float = 0.0,
              timeout_s: float = 90.0, timing: bool = True) -> dict:
    """One launch of the real driver on ``device`` (one vLLM import): (1) two calibration shapes
    and three check shapes, (2) then, made from the calibration, a slow link on a check shape and
    a rank death. The slow link divides the calibrated bandwidth by ``slow_factor``, or more, so
    that a layer moving one expert takes at least ``slow_min_s`` longer (a latency-bound link, as
    gloo on one CPU host, may calibrate to a near-infinite bandwidth that no factor slows down).
    Every check run is compared with the model calibrated on the calibration runs, and so are the
    model's mutants (each must be
    caught); the death is reported with the model's prediction of the step the engine fails in.

    ``timing=False`` (the CPU diff tier on a shared host) judges only what does not depend on the
    wall clock (checkers/eplb.py ``judge_run``): the slow link is still run and its placement,
    protocol and counts checked, but the model that ignores it (caught by transfer times only)
    and the step the engine fails in after the rank death are left to ``timing=True``
    (benchmarks/eplb_timing.py, the GPU tier); every figure is still in the summary."""
    from pathlib import Path

    from ..drivers import real_eplb as re
    out = Path(out_dir)
    base = dict(device=device, communicator=communicator, forward_s=forward_s, timeout_s=timeout_s)
    cal = [re.Shape(4, 8, 0, hidden), re.Shape(3, 6, 2, hidden)]
    shapes = [re.Shape(4, 8, 4, hidden), re.Shape(6, 12, 4, hidden), re.Shape(5, 16, 8, hidden)]
    death_plan = validate_plan([{"kind": "eplb_rank_death", "ep_rank": 1, "layer": 1}], "rank-death")

    def slow_then_death(results: list[dict]) -> list:
        link, _ = calibrate(results[:2])
        factor = max(slow_factor, 1.0 + slow_min_s * link.bandwidth / shapes[0].expert_bytes)
        slow_plan = validate_plan([{"kind": "slow_link", "start": 0, "end": 1e9, "factor": factor}], "slow-link")
        return [re.RealEplbRun(shapes[0], plan=slow_plan, link_bandwidth=link.bandwidth, **base),
                re.RealEplbRun(cal[0], plan=death_plan, **base)]
    runs = re.run([re.RealEplbRun(s, **base) for s in cal + shapes], out / "launch", then=slow_then_death)
    first, second = runs[:len(cal) + len(shapes)], runs[len(cal) + len(shapes):]
    link, sync = calibrate(first[:2])
    summary: dict = {"device": device, "communicator": communicator, "hidden": list(hidden), "forward_s": forward_s,
                     "tolerance": tol.__dict__, "link": link.__dict__, "step_sync": sync, "runs": [], "mutants": [],
                     "timing": timing}
    for res in first[2:] + second[:1]:
        rep = judge_run(res, simulate_like(res, link, step_sync=sync), tol, timing=timing)
        timed = rep if timing else judge_run(res, simulate_like(res, link, step_sync=sync), tol)
        summary["runs"].append({"shape": res["config"]["shape"], "slow_link": slow_link_factor(res),
                                "ok": rep.ok, "errors": rep.errors, "rows": rep.rows,
                                "timing_errors": [e for e in timed.errors if e not in rep.errors]})
        for mutant in EPLB_MUTANTS:
            m = judge_run(res, simulate_like(res, link, step_sync=sync, mutant=mutant), tol, timing=timing)
            summary["mutants"].append({"mutant": mutant, "shape": res["config"]["shape"]["layers"],
                                       "slow_link": slow_link_factor(res), "caught": not m.ok,
                                       "first_error": m.errors[0] if m.errors else None})
    slow = second[0]
    if timing:  # a model without the slow link differs from the real run in transfer times only
        m = judge_run(slow, simulate_like(slow, link, step_sync=sync, plan=validate_plan([])), tol)
        summary["mutants"].append({"mutant": "slow-link-not-modelled", "caught": not m.ok,
                                   "first_error": m.errors[0] if m.errors else None})
    death = second[1]
    predicted = [e for e in simulate_like(death, link, step_sync=sync) if e["event"] == "step_error"]
    summary["rank_death"] = {**death_outcome(death), "model_step_error": predicted[0]["step"] if predicted else None}
    return summary


def format_summary(s: dict) -> str:
    """A short text report of :func:`run_check`."""
    lines = [f"async EPLB, real vLLM worker vs model: device {s['device']}, communicator {s['communicator']}, "
             f"expert rows {s['hidden']} float32, forward {s['forward_s'] * 1e3:g} ms",
             f"calibrated link: latency {s['link']['latency'] * 1e3:.3f} ms, bandwidth {s['link']['bandwidth'] / 1e9:.3f} "
             f"GB/s, setup {s['link']['setup'] * 1e3:.2f} ms, gap {s['link']['gap'] * 1e3:.3f} ms, rebalance "
             f"{s['link']['rebalance'] * 1e3:.2f} ms, step all_reduce {s['step_sync'] * 1e3:.3f} ms",
             f"tolerance: per-layer transfer time {s['tolerance']['rel']:.0%} + {s['tolerance']['abs'] * 1e3:g} ms, "
             f"{s['tolerance']['outliers']} outlier(s) a run" + ("" if s.get("timing", True) else
                                                                 " (reported, not judged: timing=False)"),
             "shape (layers, logical, redundant) | slow | ok | layer: real ms / model ms, real step / model step"]
    for r in s["runs"]:
        sh = r["shape"]
        cells = " ".join(f"{w['layer']}:{w['real_ms']:.1f}/{w['model_ms']:.1f},{w['real_step']}/{w['model_step']}"
                         for w in r["rows"])
        lines.append(f"({sh['layers']}, {sh['logical']}, {sh['redundant']}) | {r['slow_link']:g} | {r['ok']} | {cells}")
        lines += [f"    ERROR {e}" for e in r["errors"]]
        lines += [f"    timing (not judged here) {e}" for e in r.get("timing_errors", ())]
    errs = [abs(w["real_ms"] - w["model_ms"]) / w["model_ms"] for r in s["runs"] for w in r["rows"]
            if w["model_ms"] and not w["setup"]]
    if errs:
        lines.append(f"per-layer transfer time |real - model| / model: median {statistics.median(errs):.1%}, "
                     f"max {max(errs):.1%} over {len(errs)} layers (each worker's first transfer left out)")
    for m in s["mutants"]:
        lines.append(f"mutant {m['mutant']} ({m.get('shape', '')}{', slow' if m.get('slow_link', 1) != 1 else ''}): "
                     f"{'caught' if m['caught'] else 'NOT CAUGHT'}: {m['first_error']}")
    d = s["rank_death"]
    main = [e["step"] for sv in d["survivors"] for e in sv["errors"] if e["thread"] == "main"]
    lines.append(f"rank death: {d['died']} exit codes {d['exit_codes']}; engine fails in step "
                 f"{main[0] if main else None} (real), {d['model_step_error']} (model)")
    for sv in d["survivors"]:
        for e in sv["errors"]:
            lines.append(f"    survivor rank {sv['rank']} {e['thread']} thread (step {e['step']}): "
                         f"+{e['after_death_ms']} ms: {e['error']}")
    return "\n".join(lines) + "\n"


def verdict(s: dict) -> list[str]:
    """Why a :func:`run_check` summary fails the acceptance (empty: it passes)."""
    bad = [f"{r['shape']['layers']} layers, slow {r['slow_link']}: {r['errors'][:3]}" for r in s["runs"] if not r["ok"]]
    bad += [f"mutant {m['mutant']} not caught" for m in s["mutants"] if not m["caught"]]
    d = s["rank_death"]
    if "hung" in d["exit_codes"]:
        bad.append(f"a survivor hung after the rank death: {d['exit_codes']}")
    main = [e["step"] for sv in d["survivors"] for e in sv["errors"] if e["thread"] == "main"]
    if not main:
        bad.append(f"no survivor's EplbState.step() raised after the rank death: {d['survivors']}")
    elif d["model_step_error"] is None:
        bad.append(f"the model predicts no failed step after the rank death (real: step {main[0]})")
    elif s.get("timing", True) and abs(main[0] - d["model_step_error"]) > 1:
        bad.append(f"engine fails in step {main[0]} (real), {d['model_step_error']} (model)")
    return bad

