"""The EPLB checker: the real async worker (harness/drivers/real_eplb.py) against the model (models/eplb.py).

Both sides are reduced to ``eplb`` trace events (``rearrange`` step; per layer ``transfer`` start,
``publish``, ``consume`` step; the real side's per-rank send/recv counts) and compared on traces
only (:func:`judge_run`):

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
- deterministic (always judged, :func:`judge_run` with ``timing=False`` judges only these and the
  above): the first rearrangement's step; every later one at vLLM's rule on that side's own
  consume steps (``EplbState.step()`` rearranges once ``step_interval`` steps passed *and* the
  previous rearrangement's last layer was consumed: ``max(previous + step_interval, last
  consume)``); every layer consumed after its rearrangement, in a step of its own, by every rank
  in the same step; the consumed layers and the send/recv counts identical to the model's;
- wall-clock (``timing=True`` only: the GPU tier and benchmarks/eplb_timing.py, never the CPU
  diff tier, whose shared host stretches any transfer): the consume step of each layer and the
  later rearrangement steps equal to the model's, the number of rearrangements, and
- timing: each layer's transfer time (``transfer_layer`` call -> publication, slowest rank) is
  within ``tol.rel`` x model + ``tol.abs`` of the model's (``tol.outliers`` layers a run may
  miss); each worker's first transfer (a
  one-time set-up of its stream and buffers: 0-19 ms on the H200s, the model's ``setup``) is
  reported, not asserted. (vLLM runs one worker per process; the driver starts one per run.)

The model's link is calibrated (:func:`calibrate`) on other runs of the same host and backend.
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class Tolerance:
    rel: float = 0.5      # per-layer transfer time: |real - model| <= rel * model + abs
    abs: float = 0.005
    step_margin: float = 0.005  # a layer ready within this of a step boundary may land a step either side
    outliers: int = 0     # layers per run whose transfer time may miss (a shared host's scheduling hiccups)


# ---- the real side as a trace ----------------------------------------------------------------

def _rank_events(rank_doc: dict, kind: str) -> list[dict]:
    return [e for e in rank_doc["events"] if e["kind"] == kind]


def _with_cycles(rank_doc: dict) -> dict:
    """The rank's events, each tagged with its rearrangement (``cycle``: how many ``rearrange``
    events the rank recorded before it, in the rank's own order of recording). The ranks' clocks
    start apart, so the merged events cannot be grouped by time: a loaded host can put one rank's
    next transfer before the other rank's ``rearrange``."""
    cycle, out = -1, []
    for e in rank_doc["events"]:
        if e["kind"] == "rearrange":
            cycle += 1
        out.append({**e, "cycle": cycle})
    return {**rank_doc, "events": out}


def real_events(result: dict) -> list[dict]:
    """The ranks' observations merged into ``eplb`` events (times relative to each rank's start)."""
    ranks = [_with_cycles(r) for r in result["ranks"] if r is not None]
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
                    "sent": [e["sent"] for e in tr], "recv": [e["recv"] for e in tr], "cycle": tr[0]["cycle"]})
        out.append({"kind": "eplb", "event": "publish", "layer": pub[0]["layer"], "t": end, "cycle": pub[0]["cycle"]})
    for i in range(min(len(p[2]) for p in per_rank)):
        c = [p[2][i] for p in per_rank]
        out.append({"kind": "eplb", "event": "consume", "layer": c[0]["layer"], "step": c[0]["step"],
                    "t": max(e["t"] for e in c), "steps": sorted({e["step"] for e in c}), "cycle": c[0]["cycle"]})
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
    """Events grouped by rearrangement: by their ``cycle`` tag where the real side's ranks gave one
    (:func:`real_events`), else by time (each rearrange opens one: the model's single clock)."""
    out = [{"transfer": [], "publish": [], "consume": []} for e in events if e["event"] == "rearrange"]
    opened = 0
    for e in events:
        if e["event"] == "rearrange":
            opened += 1
        elif e["event"] in ("transfer", "publish", "consume"):
            c = e["cycle"] if "cycle" in e else opened - 1
            if 0 <= c < len(out):
                out[c][e["event"]].append(e)
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


# ---- model vs real -----------------------------------------------------------------------------

@dataclass
class Report:
    errors: list[str]
    rows: list[dict]            # per layer: cycle, layer, real/model transfer time, consume steps

    @property
    def ok(self) -> bool:
        return not self.errors


def rearrangement_rule_errors(events: list[dict], step_interval: int, cycles: int) -> list[str]:
    """vLLM 0.26.0's ``EplbState.step()`` on one side's trace, from its own steps only (no clock):
    a rearrangement at step R is followed by the next at ``max(R + step_interval, C)``, C the
    step that consumed R's last layer (async: the counter waits while ``rebalanced``); every
    layer is consumed after its rearrangement's step."""
    errs = []
    rs = [e["step"] for e in events if e["event"] == "rearrange"][:cycles]
    cycs = _cycles(events, 0)
    for c, (r, cyc) in enumerate(zip(rs, cycs)):
        steps = [e["step"] for e in cyc["consume"]]
        if steps and min(steps) <= r:
            errs.append(f"rearrangement {c} (step {r}): a layer consumed in step {min(steps)}, not after it")
        if c + 1 < len(rs) and steps:
            want = max(r + step_interval, steps[-1])
            if rs[c + 1] != want:
                errs.append(f"rearrangement {c + 1} in step {rs[c + 1]}, vLLM's rule gives {want} "
                            f"(rearrangement {c} in step {r}, its last layer consumed in step {steps[-1]}, "
                            f"interval {step_interval})")
    return errs


def judge_run(result: dict, model: list[dict], tol: Tolerance = Tolerance(), *, timing: bool = True) -> Report:
    """Placement, protocol on both sides, and the twin comparison of one real run; ``timing``
    also judges what depends on the wall clock (consume steps, later rearrangement steps,
    per-layer transfer times: see the module docstring). Rows always carry the figures."""
    layers = result["config"]["shape"]["layers"]
    real = real_events(result)
    errs = placement_errors(result)
    errs += [f"real: {e}" for e in protocol_errors(real, layers)]
    errs += [f"model: {e}" for e in protocol_errors(model, layers)]
    n = result["config"]["cycles"]  # a further rearrangement may start as the last one ends: not compared
    interval = result["config"]["step_interval"]
    errs += [f"real: {e}" for e in rearrangement_rule_errors(real, interval, n)]
    errs += [f"model: {e}" for e in rearrangement_rule_errors(model, interval, n)]
    rs = [e["step"] for e in real if e["event"] == "rearrange"][:n]
    ms = [e["step"] for e in model if e["event"] == "rearrange"][:n]
    if timing and rs != ms:
        errs.append(f"rearrangement steps: real {rs}, model {ms}")
    elif not timing and (rs[:1] != ms[:1] or len(rs) != n or len(ms) != n):
        errs.append(f"rearrangement steps: real {rs}, model {ms} ({n} expected, the first in the same step)")
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
            if timing and not setup and abs(real_dur - model_dur) > tol.rel * model_dur + tol.abs:
                slow.append(f"rearrangement {c} layer {layer}: transfer time real {real_dur * 1e3:.2f} ms, model "
                            f"{model_dur * 1e3:.2f} ms (tolerance {tol.rel:.0%} + {tol.abs * 1e3:g} ms)")
            slack = _boundary_slack(model, mp["t"])
            if len(rcn.get("steps", [rcn["step"]])) > 1:
                errs.append(f"rearrangement {c} layer {layer}: ranks consumed it in different steps {rcn['steps']}")
            off = rcn["step"] - mcn["step"] - shift
            if timing and off and not (abs(off) == 1 and slack < tol.step_margin):
                errs.append(f"rearrangement {c} layer {layer}: consumed in step {rcn['step']} (real), "
                            f"{mcn['step'] + shift} (model, anchored on the real previous layer)")
            shift = rcn["step"] - mcn["step"]
            rows.append({"cycle": c, "layer": layer, "real_ms": round(real_dur * 1e3, 3),
                         "model_ms": round(model_dur * 1e3, 3), "real_step": rcn["step"], "model_step": mcn["step"],
                         "sent": rt["sent"], "recv": rt["recv"], "setup": setup})
        if len(rc["consume"]) != len(mc["consume"]):
            errs.append(f"rearrangement {c}: {len(rc['consume'])} layers consumed (real), {len(mc['consume'])} (model)")
    if timing and len(rs) != len(ms):
        errs.append(f"rearrangements: {len(rs)} real, {len(ms)} model")
    if len(slow) > tol.outliers:
        errs += slow
    return Report(errs, rows)


def _boundary_slack(model: list[dict], ready: float) -> float:
    """How close the model's publication time is to a step boundary (an ``EplbState.step()`` call)."""
    return min((abs(e["t"] - ready) for e in model if e["event"] == "step"), default=float("inf"))
