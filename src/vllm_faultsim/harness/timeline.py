"""A run's timeline as a picture, drawn from its trace alone (any side: simulator or real driver).

Three panels over time: tokens scheduled per step (prefill and decode) with preemptions; requests
in the engine (arrived, not ended) and scheduled per step; each request's time to first token at
its arrival, and the time to failure of those that failed or were aborted (rejected on arrival:
at 0.1 ms). The plan's faults are
drawn over every panel: windows shaded, point faults and the engine's death as vertical lines.
"""

from __future__ import annotations

import heapq
from array import array
from pathlib import Path
from typing import Iterable


FLOOR_MS = 0.1  # a request rejected on arrival (0 ms) is drawn here on the log axis


class Timeline:
    """The series a timeline draws, taken from a trace's events one at a time (:meth:`add`) into
    compact arrays: the trace itself is never held (``plot`` streams it: trace.iter_trace)."""

    def __init__(self):
        self.header: dict = {}
        self.events, self.last_kind = 0, None  # how many were added, the kind of the last
        self.t, self.prefill, self.decode, self.running = array("d"), array("q"), array("q"), array("q")
        self.preempted: tuple[array, array] = (array("d"), array("q"))  # (t, count) of steps that preempted
        self.arrival, self.finish = array("d"), array("d")  # of every request / of those that finished
        self.ttft: tuple[array, array] = (array("d"), array("d"))  # (arrival, ms) of those with a first token
        self.ended = {"failed": (array("d"), array("d")), "aborted": (array("d"), array("d"))}  # (arrival, ms)
        self.dead: list[float] = []

    def add(self, e: dict) -> None:
        kind = self.last_kind = e["kind"]
        self.events += 1
        if kind == "step":
            sched = e["sched"].values()
            self.t.append(e["t"])
            self.prefill.append(sum(v for v in sched if v > 1))
            self.decode.append(sum(1 for v in sched if v == 1))
            self.running.append(len(sched))
            if e.get("preempted"):
                self.preempted[0].append(e["t"])
                self.preempted[1].append(len(e["preempted"]))
        elif kind == "req":
            arrival, finish, status = e["arrival"], e["finish"], e["status"]
            self.arrival.append(arrival)
            if finish is not None:
                self.finish.append(finish)
            if status in ("failed", "aborted"):
                if finish is not None:
                    x, y = self.ended[status]
                    x.append(arrival)
                    y.append(max(FLOOR_MS, 1e3 * (finish - arrival)))
            elif e["first_token"] is not None:
                self.ttft[0].append(arrival)
                self.ttft[1].append(1e3 * (e["first_token"] - arrival))
        elif kind == "proc" and e.get("event") == "engine_dead":
            self.dead.append(e["t"])
        elif kind == "header":
            self.header = e

    def inside(self) -> tuple[array, array]:
        """Requests in the engine (arrived, not ended) after each arrival or finish, in time order;
        an arrival before a finish at the same time (a request rejected at once)."""
        xs, ys, n = array("d"), array("q"), 0
        for t, d in heapq.merge(((t, -1) for t in sorted(self.arrival)), ((t, 1) for t in sorted(self.finish))):
            n -= d
            xs.append(t)
            ys.append(n)
        return xs, ys


def timeline_of(events: Iterable[dict]) -> Timeline:
    tl = Timeline()
    for e in events:
        tl.add(e)
    return tl


def plot_timeline(events: Iterable[dict] | Timeline, path: str | Path, title: str = "") -> None:
    """Write the timeline of a trace's events (or of their :class:`Timeline`) to ``path`` (PNG).
    Needs matplotlib (extra ``plot``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = events if isinstance(events, Timeline) else timeline_of(events)
    faults = s.header.get("config", {}).get("plan", {}).get("faults", [])
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    a.plot(s.t, s.prefill, lw=0.8, label="prefill tokens")
    a.plot(s.t, s.decode, lw=0.8, label="decode tokens")
    if s.preempted[0]:
        a.scatter(*s.preempted, marker="x", color="red", zorder=3, label="preemptions (count)")
    a.set(ylabel="tokens / step", title=title or "vllm-faultsim run")
    if s.arrival:
        b.step(*s.inside(), where="post", lw=0.8, label="in the engine")
    b.plot(s.t, s.running, lw=0.8, label="scheduled this step")
    b.set(ylabel="requests")
    if s.ttft[0]:
        c.scatter(*s.ttft, s=4, label="time to first token")
    for status, color, what in (("failed", "red", "failure"), ("aborted", "orange", "abort")):
        if s.ended[status][0]:
            c.scatter(*s.ended[status], s=8, marker="x", color=color, label=f"{status}: time to {what}")
    c.set(ylabel="ms (at arrival)", xlabel="time (s)", yscale="log")
    for ax in (a, b, c):
        for f in faults:
            if "start" in f:
                ax.axvspan(f["start"], f["end"], color="grey", alpha=0.15, lw=0)
            elif "at" in f:
                ax.axvline(f["at"], color="red", ls="--", lw=0.8)
        for t in s.dead:
            ax.axvline(t, color="black", ls=":", lw=1.0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    kinds = sorted({f["kind"] for f in faults})
    if kinds or s.dead:
        fig.text(0.01, 0.005, "faults: " + ", ".join(kinds) + " (shaded: windows, dashed: points)"
                 + ("; dotted: engine dead" if s.dead else ""), fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
