"""A run's timeline as a picture, drawn from its trace alone (any side: simulator or real driver).

Three panels over time: tokens scheduled per step (prefill and decode) with preemptions; requests
in the engine (arrived, not ended) and scheduled per step; each request's time to first token at
its arrival, and the time to failure of those that failed or were aborted (rejected on arrival:
at 0.1 ms). The plan's faults are
drawn over every panel: windows shaded, point faults and the engine's death as vertical lines.
"""

from __future__ import annotations

from pathlib import Path


FLOOR_MS = 0.1  # a request rejected on arrival (0 ms) is drawn here on the log axis


def _series(events: list[dict]) -> dict:
    steps = [e for e in events if e["kind"] == "step"]
    reqs = [e for e in events if e["kind"] == "req"]
    changes = sorted([(r["arrival"], -1) for r in reqs] + [(r["finish"], 1) for r in reqs if r["finish"] is not None])
    inside, n = [], 0
    for t, d in changes:  # an arrival before a finish at the same time (a request rejected at once)
        n -= d
        inside.append((t, n))
    return {
        "t": [s["t"] for s in steps],
        "prefill": [sum(v for v in s["sched"].values() if v > 1) for s in steps],
        "decode": [sum(1 for v in s["sched"].values() if v == 1) for s in steps],
        "running": [len(s["sched"]) for s in steps],
        "preempted": [(s["t"], len(s["preempted"])) for s in steps if s.get("preempted")],
        "inside": inside,
        "ttft": [(r["arrival"], 1e3 * (r["first_token"] - r["arrival"])) for r in reqs
                 if r["first_token"] is not None and r["status"] not in ("failed", "aborted")],
        "ended": [(r["arrival"], max(FLOOR_MS, 1e3 * (r["finish"] - r["arrival"])), r["status"]) for r in reqs
                  if r["status"] in ("failed", "aborted") and r["finish"] is not None],
        "dead": [e["t"] for e in events if e["kind"] == "proc" and e.get("event") == "engine_dead"],
    }


def plot_timeline(events: list[dict], path: str | Path, title: str = "") -> None:
    """Write the timeline of a trace's events to ``path`` (PNG). Needs matplotlib (extra ``plot``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = _series(events)
    faults = events[0].get("config", {}).get("plan", {}).get("faults", [])
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    a.plot(s["t"], s["prefill"], lw=0.8, label="prefill tokens")
    a.plot(s["t"], s["decode"], lw=0.8, label="decode tokens")
    if s["preempted"]:
        a.scatter(*zip(*s["preempted"]), marker="x", color="red", zorder=3, label="preemptions (count)")
    a.set(ylabel="tokens / step", title=title or "vllm-faultsim run")
    if s["inside"]:
        b.step(*zip(*s["inside"]), where="post", lw=0.8, label="in the engine")
    b.plot(s["t"], s["running"], lw=0.8, label="scheduled this step")
    b.set(ylabel="requests")
    if s["ttft"]:
        c.scatter(*zip(*s["ttft"]), s=4, label="time to first token")
    for status, color, what in (("failed", "red", "failure"), ("aborted", "orange", "abort")):
        pts = [(x, y) for x, y, st in s["ended"] if st == status]
        if pts:
            c.scatter(*zip(*pts), s=8, marker="x", color=color, label=f"{status}: time to {what}")
    c.set(ylabel="ms (at arrival)", xlabel="time (s)", yscale="log")
    for ax in (a, b, c):
        for f in faults:
            if "start" in f:
                ax.axvspan(f["start"], f["end"], color="grey", alpha=0.15, lw=0)
            elif "at" in f:
                ax.axvline(f["at"], color="red", ls="--", lw=0.8)
        for t in s["dead"]:
            ax.axvline(t, color="black", ls=":", lw=1.0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    kinds = sorted({f["kind"] for f in faults})
    if kinds or s["dead"]:
        fig.text(0.01, 0.005, "faults: " + ", ".join(kinds) + " (shaded: windows, dashed: points)"
                 + ("; dotted: engine dead" if s["dead"] else ""), fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
