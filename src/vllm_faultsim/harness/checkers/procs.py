"""The checker for engine-process deaths: compares a simulator trace with a real one (traces
only, never either side's state; it runs offline on saved traces) and judges the model's
detection-latency distribution against measured latencies.

Compared exactly (:func:`classify`), per case:

- ``exits``       per rank: the exit code (MP) or the actor outcome (Ray)
- ``exit_by``     per rank: ``self`` (it ended before any manager shutdown began) or the cause of
                  the manager shutdown that ended it (``monitor`` or ``client``)
- ``detect``      whether the monitor detected an exit, which rank it names as failed (and, MP,
                  the ``failed_proc_name``), which rank exited first. Whether a process that
                  exited 0 is named depends on a race in 0.26.0 (``proc.exitcode`` read before the
                  reap; models/engine_procs.py): per case both outcomes are one class, and the
                  naming rate is judged over the matrix (:func:`compare_code0_naming`)
- ``monitor_error``, ``manager_shutdowns`` (causes, in order), ``stops`` (causes),
  ``engine_dead`` (via), ``probe`` (``request_failed`` / ``request_accepted``)
- ``faults``      which faults applied
- ``shutdown_order`` per rank: the connectors whose ``shutdown()`` ran, in order
- ``ops``         per rank/role/connector: operations done, drained, lost

Times are not compared case by case; detection latencies are pooled and compared as
distributions (:func:`compare_latency`). The fault matrix (:func:`matrix_cases`) is the set of
cases ``signal x phase x rank`` on :func:`matrix_scenario`.

Offline: ``python -m vllm_faultsim.harness.checkers.procs SIM.jsonl REAL.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Iterable

from ...models.engine_procs import LatencyModel
from ..trace import read_trace

MATRIX_PHASES = ("idle", "mid_step", "shutdown")
LATENCY_TOLERANCE = 0.25  # model p50 within +-25% of the measured p50
NAMING_ALPHA = 1e-3       # reject a code-0 naming rate the real namings make this unlikely
RACE = "race: exit code 0"  # a code-0 exit named or not, depending on the reap (see engine_procs)


def _proc(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e.get("kind") == "proc" and e["event"] == name]


def _name(failed_name: str | None) -> str | None:
    """Ray names the failed actor by its run ref (``Actor ObjectRef(...)``): compare the form."""
    return "Actor <ref>" if failed_name and failed_name.startswith("Actor ") else failed_name


def classify(events: list[dict]) -> dict:
    """The facts of a trace that both sides must agree on."""
    exits = {e["rank"]: e for e in _proc(events, "exit")}
    shutdowns = _proc(events, "shutdown")
    exit_by = {}
    for r, e in sorted(exits.items()):
        before = [s for s in shutdowns if s["t"] <= e["t"]]
        exit_by[r] = before[0]["cause"] if before else "self"
    detect = []
    code0_named = []
    for d in _proc(events, "detect"):
        codes = {r: e.get("exitcode") for r, e in exits.items()}
        entry = {"failed": d["failed"], "failed_name": _name(d["failed_name"]), "first_exit": d["first_exit"]}
        if codes.get(d["first_exit"]) == 0 and (d["failed"] is None or codes.get(d["failed"]) == 0):
            code0_named.append(d["failed"] is not None)
            entry.update(failed=RACE, failed_name=RACE)
        detect.append(entry)
    dead = _proc(events, "engine_dead")
    probe = [e["event"] for e in events if e.get("kind") == "proc" and e["event"] in ("request_failed", "request_accepted")]
    order: dict[int, list[str]] = {}
    for e in _proc(events, "connector_shutdown"):
        order.setdefault(e["rank"], []).append(f"{e['role']}.{e['connector']}")
    end = [e for e in events if e.get("kind") == "end"]
    return {
        "exits": {r: e.get("exitcode", e.get("outcome")) for r, e in sorted(exits.items())},
        "exit_by": exit_by,
        "detect": detect,
        "_code0_named": code0_named,
        "monitor_error": bool(_proc(events, "monitor_error")),
        "manager_shutdowns": [s["cause"] for s in shutdowns],
        "stops": [s["cause"] for s in _proc(events, "stop")],
        "engine_dead": [d["via"] for d in dead],
        "probe": probe,
        "faults": [e["applied"] for e in events if e.get("kind") == "fault"],
        "shutdown_order": dict(sorted(order.items())),
        "ops": end[0]["summary"]["ops"] if end else {},
    }


def fate_differences(sim: list[dict], real: list[dict]) -> list[str]:
    """Divergences between two traces, one line each (empty: identical classification)."""
    a, b = classify(sim), classify(real)
    return [f"{k}: sim={a[k]!r} real={b[k]!r}" for k in a if not k.startswith("_") and a[k] != b[k]]


def code0_naming(traces: Iterable[list[dict]]) -> list[bool]:
    """For each detection whose first exit had code 0: was that process named as failed?"""
    return [named for ev in traces for named in classify(ev)["_code0_named"]]


def binomial_p_value(k: int, n: int, rate: float) -> float:
    """Two-sided exact test: the probability of an outcome no likelier than ``k`` of ``n``."""
    probs = [math.comb(n, i) * rate ** i * (1 - rate) ** (n - i) for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


def compare_code0_naming(real: list[bool], rate: float, alpha: float = NAMING_ALPHA) -> dict:
    """Are the real namings of code-0 exits consistent with a model that names them at ``rate``?"""
    k, n = sum(real), len(real)
    p = binomial_p_value(k, n, rate) if n else 1.0
    return {"n": n, "named": k, "model_rate": rate, "p_value": p, "ok": p >= alpha}


def latencies(events: list[dict]) -> list[tuple[str, float]]:
    """(cause, seconds) of each detection in a trace."""
    return [(d["cause"], d["latency"]) for d in _proc(events, "detect")]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def compare_latency(model: LatencyModel, backend: str, measured: list[tuple[str, float]],
                    client_rss_mb: float | None = None, tolerance: float = LATENCY_TOLERANCE,
                    pooled: bool = False) -> dict:
    """Per cause (or, ``pooled``, all causes as one group named ``pooled``): measured p50/p90/p99
    and n, the model's p50 (for a client of ``client_rss_mb``; pooled: the median of the model's
    mixture of the causes, weighted as measured), their ratio and whether the model's p50 lies
    within +-tolerance of the measured one."""
    groups = {"pooled": measured} if pooled else {
        cause: [m for m in measured if m[0] == cause] for cause in sorted({c for c, _ in measured})}
    out = {}
    for name, group in groups.items():
        xs = [x for _, x in group]
        m50 = statistics.median(xs)
        if pooled:
            p50 = statistics.median(model.quantile(backend, c, (k + 0.5) / 50, client_rss_mb)
                                    for c, _ in group for k in range(50))
        else:
            p50 = model.quantile(backend, name, 0.5, client_rss_mb)
        out[name] = {"n": len(xs), "measured_p50": m50, "measured_p90": percentile(xs, 0.9),
                     "measured_p99": percentile(xs, 0.99), "model_p50": p50,
                     "ratio": p50 / m50 if m50 > 0 else float("inf"),
                     "ok": abs(p50 - m50) <= tolerance * m50}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_faultsim.harness.checkers.procs",
                                 description="Compare a simulator trace with a real one (engine processes).")
    ap.add_argument("sim")
    ap.add_argument("real")
    args = ap.parse_args(argv)
    diffs = fate_differences(read_trace(args.sim), read_trace(args.real))
    for d in diffs:
        print(d)
    print("identical classification" if not diffs else f"{len(diffs)} divergence(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
