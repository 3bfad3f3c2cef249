"""Checks of a deployment trace (harness/runs/deploy.py), from its events only.

- conservation: every request the client sent ends exactly once (one ``client`` event each, as
  many as the summary's ``requests``), and every try (``req`` event) belongs to one of them;
- a server's death is the whole server's: from its ``server_down`` until its ``server_up`` no try
  is sent to it, and none of its ranks' tries is still running past the ``server_down`` (each
  ended, failed or aborted, by then): one DP rank's death takes every rank down.
"""

from __future__ import annotations


def deployment_problems(events: list[dict]) -> list[str]:
    """What is wrong with a deployment trace; empty when nothing is."""
    problems: list[str] = []
    clients: dict[str, dict] = {}
    for e in events:
        if e["kind"] == "client":
            if e["req"] in clients:
                problems.append(f"request {e['req']} ended twice (t={clients[e['req']]['t']} and t={e['t']})")
            clients[e["req"]] = e
    end = next((e for e in events if e["kind"] == "end"), None)
    if end is not None and end["summary"]["requests"] != len(clients):
        problems.append(f"{end['summary']['requests']} requests in the summary, {len(clients)} ended")
    tries = [e for e in events if e["kind"] == "req"]
    for e in tries:
        if e["req"].split("~")[0] not in clients:
            problems.append(f"try {e['req']} of a request that never ended")
    down: dict[int, list[list[float]]] = {}  # server -> [down, up] intervals
    for e in events:
        if e["kind"] == "proc" and e["event"] == "server_down":
            down.setdefault(e["server"], []).append([e["t"], float("inf")])
        elif e["kind"] == "proc" and e["event"] == "server_up":
            down[e["server"]][-1][1] = e["t"]
    for e in tries:
        for lo, hi in down.get(e["server"], ()):
            if lo < e["arrival"] < hi:  # (a try sent at the instant of the death is a tie of the clock)
                problems.append(f"try {e['req']} sent to server {e['server']} at t={e['arrival']} while it was "
                                f"down ({lo} to {hi})")
            elif e["arrival"] < lo < e["finish"]:
                problems.append(f"try {e['req']} on server {e['server']} rank {e['rank']} ran on past the "
                                f"server's death at t={lo} ({e['status']} at t={e['finish']})")
    return problems
