"""Native CPU KV offloading on the GPU under block pressure, with prefix reuse, against the simulator.

48 GPU blocks (768 tokens) cannot keep six 200-token prompts, so round 1's KV is offloaded to the
CPU tier (``kv_offloading_size``: vLLM's OffloadingConnector with its real GPU worker) and evicted
from the GPU; rounds 2 and 3 send the same prompts again. A round starts once the previous one's
transfers are done. Recorded per step by the recording scheduler: store jobs, load jobs (with the
request-relative blocks they cover), jobs to flush, jobs completed.

The simulator's prediction: the same rounds through the simulator's offloading model
(``models.kv_offload`` in ``harness.drivers.real_offload.RealOffloadCore(connector="sim")``, driven by
``runs.offload.run_offload``; rounds 5 s apart on its virtual clock), one GPU block per chunk.

Compared exactly (no tolerance; transfer *timing* differs between a GPU and a virtual clock, but
rounds are separated, so what is stored, loaded and cached does not depend on it):
- per request: cached tokens (real: ``RequestOutput.num_cached_tokens``; sim: the prompt tokens
  it did not schedule), which is also the block rule ``(prompt_len - 1) // 16 * 16`` = 192 of 200
  from round 2 on, 0 in round 1;
- per request: the chunks of each store job and of each load job;
- nothing pending when the engine stops: every job submitted was reported done, the connector
  has no job left, and the engine kept stepping while it had push work (vLLM >= 0.24
  ``has_pending_push_work``; 0.23 flushed instead). The simulated trace passes the offload
  invariants (``checkers.offload.invariants``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_faultsim.harness.drivers import model_dirs
from vllm_faultsim.harness.drivers import real_engine as RE
from vllm_faultsim.harness.drivers.dry_run import DRYRUN
from vllm_faultsim.harness.drivers.wall_clock import run_rounds
from vllm_faultsim.harness.runs.gpu import write_json
from vllm_faultsim.harness.trace import Trace, header
from vllm_faultsim.harness.workload import RequestSpec, validate
from vllm_faultsim.models.scheduler import SchedulerConfig

# max_model_len 512: 48 blocks hold 768 tokens, and vLLM refuses a model length the KV cache cannot hold
SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=48,
                        max_model_len=512)
PROMPTS, PROMPT_LEN, OUTPUT, ROUNDS, GAP = 6, 200, 16, 3, 5.0


def rounds():
    # the same token ids in every round: the whole prompt is the prefix of group i
    return [[RequestSpec(f"g{i}-r{r}", GAP * r, PROMPT_LEN, OUTPUT, prefix=(i, PROMPT_LEN)) for i in range(PROMPTS)]
            for r in range(ROUNDS)]


def expected_cached(spec: RequestSpec, rnd: int) -> int:
    return 0 if rnd == 0 else (spec.prompt_len - 1) // SCHED.block_size * SCHED.block_size


def per_request(jobs) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for job in jobs:
        out.setdefault(job[1], []).append(list(job[2]))
    return {r: sorted(v) for r, v in sorted(out.items())}


def simulate_rounds(specs):
    from vllm_faultsim.harness.runs import offload as oc
    from vllm_faultsim.harness.drivers.real_offload import OffloadSchedConfig, RealOffloadCore
    from vllm_faultsim.models import kv_offload as ko
    sc = OffloadSchedConfig(max_num_seqs=SCHED.max_num_seqs, max_num_batched_tokens=SCHED.max_num_batched_tokens,
                            block_size=SCHED.block_size, num_gpu_blocks=SCHED.num_gpu_blocks,
                            max_model_len=SCHED.max_model_len)
    core = RealOffloadCore(sc, ko.OffloadConfig(block_size=16, blocks_per_chunk=1, num_cpu_chunks=4096,
                                                bytes_per_block=4096), connector="sim")
    events = oc.run_offload(core, specs)
    steps = [e for e in events if e["kind"] == "step"]
    sched_tokens: dict[str, int] = {}
    for e in steps:
        for r, n in e["sched"].items():
            sched_tokens[r] = sched_tokens.get(r, 0) + n
    reqs = {e["req"]: e for e in events if e["kind"] == "req"}
    by_id = {s.req_id: s for s in specs}
    cached = {r: by_id[r].prompt_len + e["num_output"] - 1 - sched_tokens[r] for r, e in reqs.items()}
    kv = [e.get("kv") or {} for e in steps]
    return {"cached": dict(sorted(cached.items())),
            "store": per_request(j for k in kv for j in k.get("store", ())),
            "load": per_request(j for k in kv for j in k.get("load", ())),
            "preempted": sum(len(e.get("preempted", ())) for e in steps),
            "invariants": oc.invariants(events, specs, 16), "events": events}


def simulate_rounds_on_cpu(tmp_path) -> dict:
    """The simulator side runs as the differential tier runs it: vLLM's Scheduler on no
    accelerator platform, in its own process (on a CUDA platform vLLM turns on its hybrid KV cache
    manager, which ``real_offload``'s connectors do not declare support for)."""
    out = tmp_path / "kv_sim.json"
    run = subprocess.run([sys.executable, __file__, "--simulate", str(out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return json.loads(out.read_text())


def test_kv_offload_matches_simulator_and_nothing_pending(results_dir, device, tmp_path):
    if DRYRUN:
        pytest.skip("KV offloading needs a real worker (VLLM_FAULTSIM_DRYRUN has none)")
    rs = rounds()
    kw = RE.engine_args(SCHED, model=model_dirs.tiny_llama(), kv_offload_gib=0.5, prefix_caching=True)
    llm = RE.open_llm(**kw)
    try:
        out = run_rounds(llm, rs)
    finally:
        RE.shutdown_llm(llm)
    sim = simulate_rounds_on_cpu(tmp_path)
    reqs = out["requests"]
    kvs = [st.get("kv") or {} for st in out["steps"]]
    store_jobs = [j for k in kvs for j in k.get("store", ())]
    load_jobs = [j for k in kvs for j in k.get("load", ())]
    flush = sorted({j for k in kvs for j in k.get("flush", ())})
    done = {j for k in kvs for j in k.get("done", ())}
    cached = {rid: rec["cached"] for rid, rec in sorted(reqs.items())}
    expected = {s.req_id: expected_cached(s, r) for r, specs in enumerate(rs) for s in specs}
    real_store, real_load = per_request(store_jobs), per_request(load_jobs)
    with Trace(results_dir / "trace_kv_gpu.jsonl") as tr:
        tr.emit(header("gpu", 0, {"scheduler": SCHED.__dict__, "kv_offloading_size_gib": 0.5,
                                  "rounds": [[s.req_id for s in specs] for specs in rs]}))
        for st in out["steps"]:
            ev = {"kind": "step", "step": st["i"], "t": st["t0"], "dur": st["dur"], "sched": st["sched"]}
            for key in ("finished", "preempted", "kv"):
                if st.get(key):
                    ev[key] = st[key]
            tr.emit(ev)
        for rid, rec in reqs.items():
            tr.emit({"kind": "req", "req": rid, "status": "length", "arrival": rec["arrival"],
                     "first_token": rec["first_token"], "finish": rec["finish"], "num_output": rec["num_output"],
                     "preemptions": 0, "cached": rec["cached"]})
    write_json(results_dir / "kv_offload.json", {
        "device": device, "requests": len(reqs),
        "cached_tokens": {"gpu": cached, "sim": dict(sorted(sim["cached"].items())), "rule": expected},
        "cached_identical": cached == sim["cached"] == expected,
        "store_chunks_identical": real_store == sim["store"], "load_chunks_identical": real_load == sim["load"],
        "store_chunks": {"gpu": real_store, "sim": sim["store"]}, "load_chunks": {"gpu": real_load, "sim": sim["load"]},
        "store_jobs": len(store_jobs), "load_jobs": len(load_jobs), "flushed_jobs": flush, "done_jobs": len(done),
        "served_steps": out["served_steps"], "drain_steps": out["drain_steps"], "drain_ms": round(1000 * out["drain_s"], 3),
        "pending_jobs_at_stop": out["pending_jobs"], "pending_push_work_at_stop": out["pending_push_work"],
        "sim_invariant_violations": sim["invariants"]})
    assert all(rec["num_output"] == OUTPUT for rec in reqs.values())
    assert cached == expected == sim["cached"], (cached, sim["cached"])
    assert store_jobs and load_jobs, "expected stores (round 1) and loads (rounds 2-3)"
    assert real_store == sim["store"], (real_store, sim["store"])
    assert real_load == sim["load"], (real_load, sim["load"])
    assert {j[0] for j in store_jobs + load_jobs} <= done, "a job was never reported done"
    assert out["pending_jobs"] == 0 and out["pending_push_work"] is False and out["has_requests"] is False
    assert sim["invariants"] == []


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--simulate":
    # the platform the differential tier's CPU runs see (vLLM's "unspecified" platform: no
    # hybrid KV cache manager), whatever accelerator this host has
    import vllm.platforms as platforms
    from vllm.platforms.interface import UnspecifiedPlatform
    platforms._current_platform = UnspecifiedPlatform()
    res = simulate_rounds(validate([s for r in rounds() for s in r]))
    res.pop("events")
    with open(sys.argv[2], "w") as fh:
        json.dump(res, fh)

