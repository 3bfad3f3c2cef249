"""The EPLB checker: the real async worker (harness/real_eplb.py) against the model (models/eplb.py).

Both sides are reduced to ``eplb`` trace events (``rearrange`` step; per layer ``transfer`` start,
``publish``, ``consume`` step; the real side's per-rank send/recv counts) and compared on traces
only (:func:`compare`):

- placement (real side only, exact): on every rank every weight row decodes to the (logical
  expert, layer, index) that the map of the layer's last consumed publication puts in its slot;
  the committed ``physical_to_logical_map`` is that map; the first rearrangement's map is
  ``DefaultEplbPolicy``'s answer to the load; all ranks published the same maps;
- protocol (both sides, :func:`protocol_errors`): layers are published and consumed in order, one
  layer per step, a layer is published only once its transfer finished (the stream was
  synchronised: the real side's ``stream.query()``, the model's transfer end) and only after
  the previous layer was consumed;
- twin (model vs real): rearrangement steps and the send/recv counts of every layer on every
  rank are identical; the step that consumes each layer is identical, except that a layer whose
  predicted ready time is within ``tol.step_margin`` of a step boundary may be consumed one step
  either side (timing noise, reported); a layer's step is anchored on the real consumption of the
  previous layer (the worker starts the next transfer only after it), so one such layer does not
  shift every later one;
- timing: each layer's transfer time (``transfer_layer`` call -> publication, slowest rank) is
  within ``tol.rel`` x model + ``tol.abs`` of the model's (``tol.outliers`` layers a run may
  miss); each worker's first transfer (a
  one-time set-up of its stream and buffers: 0-19 ms on the H200s, the model's ``setup``) is
  reported, not asserted. (vLLM runs one worker per process; the driver starts one per run.)

The model's link is calibrated (:func:`calibrate`) on other runs of the same host and backend.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from ..models import eplb as me


@dataclass(frozen=True)
class Tolerance:
    rel: float = 0.5      # per-layer transfer time: |real - model| <= rel * model + abs
    abs: float = 0.005
    step_margin: float = 0.005  # a layer ready within this of a step boundary may land a step either side
    outliers: int = 0     # layers per run whose transfer time may miss (a shared host's scheduling hiccups)


# ---- the real side as a trace ----------------------------------------------------------------

def _rank_events(rank_doc: dict, kind: str) -> list[dict]:
    return [e for e in rank_doc["events"] if e["kind"] == kind]


def real_events(result: dict) -> list[dict]:
    """The ranks' observations merged into ``eplb`` events (times relative to each rank's start)."""
    ranks = [r for r in result["ranks"] if r is not None]
    if not ranks:
        return []
    first = ranks[0]
    out = [{"kind": "eplb", "event": "rearrange", "step": e["step"], "t": e["t"]}
           for e in _rank_events(first, "rearrange")]
    per_rank = [(_rank_events(r, "transfer"), _rank_events(r, "publish"), _rank_events(r, "consume"))
                for r in ranks]
    n = min(len(p[1]) for p in per_rank)
    for i in range(n):
        tr = [p[0][i] for p in per_rank]
        pub = [p[1][i] for p in per_rank]
        synced = all(p["stream_idle"] for p in pub)
        end = max(p["t"] for p in pub)
        out.append({"kind": "eplb", "event": "transfer", "layer": tr[0]["layer"], "t": min(e["t"] for e in tr),
                    "end": end if synced else None, "dur": round(max(p["t"] - e["t"] for p, e in zip(pub, tr)), 6),
                    "sent": [e["sent"] for e in tr], "recv": [e["recv"] for e in tr]})
        out.append({"kind": "eplb", "event": "publish", "layer": pub[0]["layer"], "t": end})
    for i in range(min(len(p[2]) for p in per_rank)):
        c = [p[2][i] for p in per_rank]
        out.append({"kind": "eplb", "event": "consume", "layer": c[0]["layer"], "step": c[0]["step"],
                    "t": max(e["t"] for e in c), "steps": sorted({e["step"] for e in c})})
    for r in ranks:
        for e in _rank_events(r, "main_error"):
            out.append({"kind": "eplb", "event": "step_error", "step": e["step"], "t": e["t"], "rank": r["rank"]})
    return sorted(out, key=lambda e: e["t"])


def placement_errors(result: dict) -> list[str]:
    """The real side's weights and maps against the published maps (exact)."""
    errs = []
    ranks = result["ranks"]
    if any(r is None for r in ranks):
        return [f"rank {i} wrote no result (exit codes {result['exit_codes']})" for i, r in enumerate(ranks) if r is None]
    for r in ranks:
        if "published_maps" not in r:
            errs.append(f"rank {r['rank']}: the run did not finish ({_rank_events(r, 'main_error')})")
            continue
        if r["num_bad_rows"]:
            errs.append(f"rank {r['rank']}: {r['num_bad_rows']} weight rows not where the new map says, "
                        f"first {r['bad_rows'][:3]}")
        if r["final_map"] != r["expected_map"]:
            errs.append(f"rank {r['rank']}: committed physical_to_logical_map != the maps of the consumed layers")
        if r["published_maps"][0] != r["policy_first"]:
            errs.append(f"rank {r['rank']}: first rearrangement's map != DefaultEplbPolicy on the load")
        if r["published_maps"] != ranks[0]["published_maps"]:
            errs.append(f"rank {r['rank']}: published maps differ from rank 0's")
    return errs


# ---- rules on one trace ------------------------------------------------------------------------

def _cycles(events: list[dict], layers: int) -> list[dict[str, list[dict]]]:
    """Events grouped by rearrangement (each rearrange opens one)."""
    out: list[dict[str, list[dict]]] = []
    for e in events:
        if e["event"] == "rearrange":
            out.append({"transfer": [], "publish": [], "consume": []})
        elif e["event"] in ("transfer", "publish", "consume") and out:
            out[-1][e["event"]].append(e)
    return out


def protocol_errors(events: list[dict], layers: int) -> list[str]:
    """PR #40730's protocol on one side's trace."""
    errs = []
    for c, cyc in enumerate(_cycles(events, layers)):
        for kind in ("transfer", "publish", "consume"):
            order = [e["layer"] for e in cyc[kind]]
            if order != list(range(len(order))):
                errs.append(f"rearrangement {c}: {kind} order {order}, expected 0, 1, ...")
        steps = [e["step"] for e in cyc["consume"]]
        if len(set(steps)) != len(steps):
            errs.append(f"rearrangement {c}: more than one layer consumed in one step (steps {steps})")
        for tr, pub in zip(cyc["transfer"], cyc["publish"]):
            if tr["end"] is None or pub["t"] < tr["end"] - 1e-9:
                errs.append(f"rearrangement {c} layer {tr['layer']}: published at {pub['t']} before its "
                            f"transfer finished ({tr['end']}): no stream synchronisation")
        for pub, prev in zip(cyc["publish"][1:], cyc["consume"]):
            if pub["t"] < prev["t"] - 1e-9:
                errs.append(f"rearrangement {c} layer {pub['layer']}: published at {pub['t']} before layer "
                            f"{prev['layer']} was consumed ({prev['t']})")
    return errs


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
    """The model run the way the real driver ran: same shape, maps, interval, forward, faults."""
    c = result["config"]
    cfg = replace(model_config(result, link, step_sync=step_sync), mutant=mutant)
    if plan is None and c["slow_link"] != 1.0:
        from ..faults.plan import validate_plan
        plan = validate_plan([{"kind": "slow_link", "start": 0, "end": 1e9, "factor": c["slow_link"]}])
    return me.simulate_main_loop(cfg, replay_policy(result), forward_s=forward_s(result), cycles=c["cycles"],
                                 extra_steps=c["extra_steps"], plan=plan)


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
    gap = statistics.median(gaps)
    link = me.EplbLink(latency=latency, bandwidth=1.0 / slope, gap=gap,
                       rebalance=max(0.0, statistics.median(rebal) - gap),
                       setup=max(0.0, statistics.median(y - latency - slope * x for x, y in firsts)))
    return link, statistics.median(syncs)


# ---- model vs real -----------------------------------------------------------------------------

@dataclass
class Report:
    errors: list[str]
    rows: list[dict]            # per layer: cycle, layer, real/model transfer time, consume steps

    @property
    def ok(self) -> bool:
        return not self.errors


def compare(result: dict, model: list[dict], tol: Tolerance = Tolerance()) -> Report:
    """Placement, protocol on both sides, and the twin/timing comparison of one real run."""
    layers = result["config"]["shape"]["layers"]
    real = real_events(result)
    errs = placement_errors(result)
    errs += [f"real: {e}" for e in protocol_errors(real, layers)]
    errs += [f"model: {e}" for e in protocol_errors(model, layers)]
    n = result["config"]["cycles"]  # a further rearrangement may start as the last one ends: not compared
    rs = [e["step"] for e in real if e["event"] == "rearrange"][:n]
    ms = [e["step"] for e in model if e["event"] == "rearrange"][:n]
    if rs != ms:
        errs.append(f"rearrangement steps: real {rs}, model {ms}")
    rows, slow = [], []
    for c, (rc, mc) in enumerate(zip(_cycles(real, layers)[:n], _cycles(model, layers)[:n])):
        if [e["layer"] for e in rc["consume"]] != [e["layer"] for e in mc["consume"]]:
            errs.append(f"rearrangement {c}: consumed layers real {[e['layer'] for e in rc['consume']]}, "
                        f"model {[e['layer'] for e in mc['consume']]}")
        shift = 0  # real minus model consume step of the previous layer: the next transfer starts after it
        for rt, mt, rp, mp, rcn, mcn in zip(rc["transfer"], mc["transfer"], rc["publish"], mc["publish"],
                                            rc["consume"], mc["consume"]):
            layer = rt["layer"]
            if (rt["sent"], rt["recv"]) != (mt["sent"], mt["recv"]):
                errs.append(f"rearrangement {c} layer {layer}: sent/recv per rank real {rt['sent']}/{rt['recv']}, "
                            f"model {mt['sent']}/{mt['recv']}")
            real_dur, model_dur = rp["t"] - rt["t"], mp["t"] - mt["t"]
            setup = c == 0 and layer == 0  # the worker's first transfer: one-time set-up, not asserted
            if not setup and abs(real_dur - model_dur) > tol.rel * model_dur + tol.abs:
                slow.append(f"rearrangement {c} layer {layer}: transfer time real {real_dur * 1e3:.2f} ms, model "
                            f"{model_dur * 1e3:.2f} ms (tolerance {tol.rel:.0%} + {tol.abs * 1e3:g} ms)")
            slack = _boundary_slack(model, mp["t"])
            if len(rcn.get("steps", [rcn["step"]])) > 1:
                errs.append(f"rearrangement {c} layer {layer}: ranks consumed it in different steps {rcn['steps']}")
            off = rcn["step"] - mcn["step"] - shift
            if off and not (abs(off) == 1 and slack < tol.step_margin):
                errs.append(f"rearrangement {c} layer {layer}: consumed in step {rcn['step']} (real), "
                            f"{mcn['step'] + shift} (model, anchored on the real previous layer)")
            shift = rcn["step"] - mcn["step"]
            rows.append({"cycle": c, "layer": layer, "real_ms": round(real_dur * 1e3, 3),
                         "model_ms": round(model_dur * 1e3, 3), "real_step": rcn["step"], "model_step": mcn["step"],
                         "sent": rt["sent"], "recv": rt["recv"], "setup": setup})
        if len(rc["consume"]) != len(mc["consume"]):
            errs.append(f"rearrangement {c}: {len(rc['consume'])} layers consumed (real), {len(mc['consume'])} (model)")
    if len(rs) != len(ms):
        errs.append(f"rearrangements: {len(rs)} real, {len(ms)} model")
    if len(slow) > tol.outliers:
        errs += slow
    return Report(errs, rows)


def _boundary_slack(model: list[dict], ready: float) -> float:
    """How close the model's publication time is to a step boundary (an ``EplbState.step()`` call)."""
    return min((abs(e["t"] - ready) for e in model if e["event"] == "step"), default=float("inf"))


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
              timeout_s: float = 90.0) -> dict:
    """Two launches of the real driver on ``device``: (1) two calibration shapes and three check
    shapes, (2) a slow link on a check shape, then a rank death. The slow link divides the
    calibrated bandwidth by ``slow_factor``, or more, so that a layer moving one expert takes at
    least ``slow_min_s`` longer (a latency-bound link, as gloo on one CPU host, may calibrate to a
    near-infinite bandwidth that no factor slows down). Every check run is compared with
    the model calibrated on the calibration runs, and so are the model's mutants (each must be
    caught); the death is reported with the model's prediction of the step the engine fails in."""
    from pathlib import Path

    from ..faults.plan import validate_plan
    from . import real_eplb as re
    out = Path(out_dir)
    base = dict(device=device, communicator=communicator, forward_s=forward_s, timeout_s=timeout_s)
    cal = [re.Shape(4, 8, 0, hidden), re.Shape(3, 6, 2, hidden)]
    shapes = [re.Shape(4, 8, 4, hidden), re.Shape(6, 12, 4, hidden), re.Shape(5, 16, 8, hidden)]
    first = re.run([re.RealEplbRun(s, **base) for s in cal + shapes], out / "launch1")
    link, sync = calibrate(first[:2])
    slow_factor = max(slow_factor, 1.0 + slow_min_s * link.bandwidth / shapes[0].expert_bytes)
    second = re.run([re.RealEplbRun(shapes[0], slow_link=slow_factor, link_bandwidth=link.bandwidth, **base),
                     re.RealEplbRun(cal[0], rank_death=(1, 1), **base)], out / "launch2")
    summary: dict = {"device": device, "communicator": communicator, "hidden": list(hidden), "forward_s": forward_s,
                     "tolerance": tol.__dict__, "link": link.__dict__, "step_sync": sync, "runs": [], "mutants": []}
    for res in first[2:] + second[:1]:
        rep = compare(res, simulate_like(res, link, step_sync=sync), tol)
        summary["runs"].append({"shape": res["config"]["shape"], "slow_link": res["config"]["slow_link"],
                                "ok": rep.ok, "errors": rep.errors, "rows": rep.rows})
        for mutant in me.MUTANTS:
            m = compare(res, simulate_like(res, link, step_sync=sync, mutant=mutant), tol)
            summary["mutants"].append({"mutant": mutant, "shape": res["config"]["shape"]["layers"],
                                       "slow_link": res["config"]["slow_link"], "caught": not m.ok,
                                       "first_error": m.errors[0] if m.errors else None})
    slow = second[0]
    m = compare(slow, simulate_like(slow, link, step_sync=sync, plan=validate_plan([])), tol)
    summary["mutants"].append({"mutant": "slow-link-not-modelled", "caught": not m.ok,
                               "first_error": m.errors[0] if m.errors else None})
    death = second[1]
    plan = validate_plan([{"kind": "eplb_rank_death", "ep_rank": 1, "layer": 1}])
    predicted = [e for e in simulate_like(death, link, step_sync=sync, plan=plan) if e["event"] == "step_error"]
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
             f"{s['tolerance']['outliers']} outlier(s) a run",
             "shape (layers, logical, redundant) | slow | ok | layer: real ms / model ms, real step / model step"]
    for r in s["runs"]:
        sh = r["shape"]
        cells = " ".join(f"{w['layer']}:{w['real_ms']:.1f}/{w['model_ms']:.1f},{w['real_step']}/{w['model_step']}"
                         for w in r["rows"])
        lines.append(f"({sh['layers']}, {sh['logical']}, {sh['redundant']}) | {r['slow_link']:g} | {r['ok']} | {cells}")
        lines += [f"    ERROR {e}" for e in r["errors"]]
    errs = [abs(w["real_ms"] - w["model_ms"]) / w["model_ms"] for r in s["runs"] for w in r["rows"]
            if w["model_ms"] and not w["setup"]]
    if errs:
        lines.append(f"per-layer transfer time |real - model| / model: median {statistics.median(errs):.1%}, "
                     f"max {max(errs):.1%} over {len(errs)} layers (each worker's first transfer left out)")
    for m in s["mutants"]:
        lines.append(f"mutant {m['mutant']} ({m.get('shape', '')}{', slow' if m.get('slow_link', 1) != 1 else ''}): "
                     f"{'caught' if m['caught'] else 'NOT CAUGHT'}: {m['first_error']}")
    d = s["rank_death"]
    lines.append(f"rank death: {d['died']} exit codes {d['exit_codes']}; model: engine fails in step "
                 f"{d['model_step_error']}")
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
    elif d["model_step_error"] is None or abs(main[0] - d["model_step_error"]) > 1:
        bad.append(f"engine fails in step {main[0]} (real), {d['model_step_error']} (model)")
    return bad
