"""The KV-offload checker: two offload traces compared step by step, and the end invariants of one."""

from __future__ import annotations

# ---- the checker ----------------------------------------------------------------------------

COMPARED = ("t", "sched", "preempted", "finished", "kv")


def offload_differences(a: list[dict], b: list[dict], limit: int = 5) -> list[str]:
    """Divergences between two offload traces, step by step, then the end events."""
    out: list[str] = []
    sa = [e for e in a if e["kind"] == "step"]
    sb = [e for e in b if e["kind"] == "step"]
    for x, y in zip(sa, sb):
        for k in COMPARED:
            if x.get(k) != y.get(k):
                out.append(f"step {x['step']} (t={x['t']}): {k} differs: {x.get(k)!r} != {y.get(k)!r}")
                break
        if len(out) >= limit:
            return out
    if len(sa) != len(sb):
        out.append(f"step counts differ: {len(sa)} != {len(sb)}")
    ea = next((e for e in a if e["kind"] == "end"), {})
    eb = next((e for e in b if e["kind"] == "end"), {})
    for k in ("pending", "lost", "dead", "failed_requests"):
        if ea.get(k) != eb.get(k):
            out.append(f"end: {k} differs: {ea.get(k)!r} != {eb.get(k)!r}")
    fa = [e for e in a if e["kind"] == "proc"]
    fb = [e for e in b if e["kind"] == "proc"]
    if fa != fb:
        out.append(f"engine deaths differ: {fa} != {fb}")
    return out[:limit] if len(out) > limit else out


# ---- the invariants ---------------------------------------------------------------------------

def invariants(events: list[dict], specs, tokens_per_chunk: int) -> list[str]:
    """Nothing lost, every flushed job retired in its step, every finished request's prompt
    chunks accounted for (stored by it, already present, loaded/hit, 'nostore', or lost with the
    engine -- a death reports exactly the jobs in flight)."""
    bad: list[str] = []
    created: dict[str, tuple[str, list[int], int]] = {}
    retired: dict[str, int] = {}
    stored: dict[str, set[int]] = {}
    accounted: dict[str, set[int]] = {}
    nostore: dict[str, set[int]] = {}
    finished: set[str] = set()
    end = next((e for e in events if e["kind"] == "end"), None)
    if end is None:
        return ["no end event"]
    steps = [e for e in events if e["kind"] == "step"]
    # async: a batch is scheduled before the previous one's output is applied, so it may flush a
    # job that output retires (the worker's wait on a finished job returns at once)
    late = bool(end.get("async_scheduling"))
    # the steps in which the engine died never returned their output (async: up to two batches)
    died_in = {u for e in events if e["kind"] == "kv_lost" for u in e.get("unapplied", ())}
    if end.get("dead") and steps:
        died_in.add(steps[-1]["step"])
    for ev in steps:
        s = ev["step"]
        kv = ev.get("kv") or {}
        for kind in ("store", "load"):
            for name, req, chunks in kv.get(kind, ()):
                if name in created:
                    bad.append(f"step {s}: job {name} created twice")
                created[name] = (req, chunks, s)
                if kind == "load":
                    accounted.setdefault(req, set()).update(range(max(chunks) + 1 if chunks else 0))
        for req, chunks in kv.get("present", ()):
            accounted.setdefault(req, set()).update(chunks)
        for req, chunks in kv.get("nostore", ()):
            nostore.setdefault(req, set()).update(chunks)
        done = set(kv.get("done", ()))
        for name in done:
            if name not in created:
                bad.append(f"step {s}: job {name} retired but never created")
            elif name in retired:
                bad.append(f"step {s}: job {name} retired twice")
            retired[name] = s
            req, chunks, _ = created.get(name, (None, [], 0))
            if name.split(":")[-1].startswith("S") and req is not None:
                stored.setdefault(req, set()).update(chunks)
        for name in kv.get("flush", ()):
            if s in died_in:
                continue
            if name not in created:
                bad.append(f"step {s}: flush of unknown job {name}")
            elif name not in done and late and retired.get(name) == s - 1:
                continue
            elif name not in done and name in retired:
                bad.append(f"step {s}: flush of job {name} already retired at step {retired[name]}")
            elif name not in done:
                bad.append(f"step {s}: flushed job {name} not retired in its step")
        finished.update(ev.get("finished", ()))
    inflight = sorted(n for n in created if n not in retired)
    if end.get("dead"):
        if sorted(end.get("lost", [])) != inflight:
            bad.append(f"engine death: reported lost {end.get('lost')} != jobs in flight {inflight}")
    else:
        if inflight:
            bad.append(f"after the drain {len(inflight)} jobs were never retired: {inflight[:5]}")
        if end.get("pending"):
            bad.append(f"after the drain the connector still tracks jobs {end['pending'][:5]}")
    for name in end.get("lost", ()) if end.get("dead") else ():  # lost with the engine: reported
        req, chunks, _ = created.get(name, (None, [], 0))
        if req is not None:
            accounted.setdefault(req, set()).update(chunks)
    plen = {sp.req_id: sp.prompt_len for sp in specs}
    for req in sorted(finished):
        full = set(range(plen[req] // tokens_per_chunk))
        missing = full - stored.get(req, set()) - accounted.get(req, set()) - nostore.get(req, set())
        if missing:
            bad.append(f"request {req} finished with prompt chunks {sorted(missing)[:8]} neither stored nor "
                       "accounted for (present, loaded, nostore)")
    return bad


def kv_summary(events: list[dict]) -> dict:
    """Counts of KV events over a trace (for reports and for tests that need 'something happened')."""
    c = {k: 0 for k in ("store", "load", "flush", "done", "present", "nostore", "evict", "delayed")}
    preempted = 0
    for ev in events:
        if ev["kind"] != "step":
            continue
        preempted += len(ev.get("preempted", ()))
        for k in c:
            c[k] += len((ev.get("kv") or {}).get(k, ()))
    c["preempted"] = preempted
    return c

