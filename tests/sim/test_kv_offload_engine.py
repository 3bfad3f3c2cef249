"""KV offloading inside the main simulator: the ``kv_offload`` run config, the engine loop
(models/engine.py, the one loop the differential tests also run on the real vLLM Scheduler +
OffloadingConnector) stepping a core with a KV connector, transfer faults and engine deaths, and
``vllm-faultsim run``."""

from __future__ import annotations

import json

import pytest
import yaml

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.harness.runs import offload as oc
from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.invariants import InvariantViolation
from vllm_faultsim.harness.runs.simulate import ConfigError, config_from_dict, run_engine, simulate
from vllm_faultsim.models import kv_offload as ko

# upstream's scenarios' shape: 4-token blocks, 2 MiB per block at 100 MB/s (stores outlast a step)
CONFIG = {"scheduler": {"block_size": 4, "num_gpu_blocks": 8, "max_num_seqs": 4, "max_num_batched_tokens": 64,
                        "max_model_len": 2048, "enable_prefix_caching": True},
          "kv_offload": {"policy": "0.24+", "num_cpu_chunks": 64, "bandwidth": 1e8, "bytes_per_block": 2 << 20}}


def config(policy: str = "0.24+", **sched):
    d = json.loads(json.dumps(CONFIG))
    d["kv_offload"]["policy"] = policy
    d["scheduler"].update(sched)
    return config_from_dict(d)


def steps(events):
    return [e for e in events if e["kind"] == "step"]


@pytest.mark.parametrize("version", ko.VERSIONS)
def test_last_step_through_simulate(version):
    """PR #42611 through `simulate` (sync): 0.23.0 flushes all on the step after the last finish
    and stops; 0.24+ keeps stepping (empty steps) until the store lands."""
    case = oc.scenario("last_step")
    res = simulate(config(version, num_gpu_blocks=32, async_scheduling=False), specs=case.specs)
    st = steps(res.events)
    assert st[0]["finished"] == ["r0"] and st[0]["kv"]["store"] == [["r0:S0", "r0", [0, 1]]]
    if version == "0.23":
        assert len(st) == 2 and st[1]["kv"]["flush"] == ["r0:S0"] and st[1]["kv"]["done"] == ["r0:S0"]
        assert st[1]["dur"] == pytest.approx(0.001 + st[1]["kv"]["wait"])
        assert res.summary["kv_flushed_jobs"] == 1 and res.summary["kv_wait_ms"] > 0
    else:
        assert len(st) > 10 and all(e["sched"] == {} and e["dur"] == 0.001 for e in st[1:])
        assert st[-1]["kv"]["done"] == ["r0:S0"] and res.summary["kv_flushed_jobs"] == 0
    assert res.summary["kv_store_jobs"] == 1 and res.summary["kv_jobs_lost"] == 0


@pytest.mark.parametrize("version", ko.VERSIONS)
def test_last_step_through_simulate_async(version):
    """The same under async scheduling (kv_offload's default, as vLLM 0.26.0's): the batch
    scheduled during r0's forward is empty; empty batches carry no forward (dur 0) and the loop
    sleeps 1 ms after each call that ran none (_process_engine_step); 0.23.0's flush blocks the
    core before its batch (the forward starts after the wait)."""
    case = oc.scenario("last_step")
    res = simulate(config(version, num_gpu_blocks=32), specs=case.specs)
    st = steps(res.events)
    assert st[0]["finished"] == ["r0"] and st[0]["kv"]["store"] == [["r0:S0", "r0", [0, 1]]]
    assert st[1] == {"kind": "step", "step": 1, "t": st[0]["dur"], "dur": 0.0, "sched": {}}
    assert all(e["sched"] == {} and e["dur"] == 0.0 for e in st[1:])
    if version == "0.23":
        assert len(st) == 3 and st[2]["kv"]["flush"] == ["r0:S0"] and st[2]["kv"]["done"] == ["r0:S0"]
        assert res.summary["kv_flushed_jobs"] == 1 and res.summary["kv_wait_ms"] > 0
    else:
        assert len(st) > 10 and [round(b["t"] - a["t"], 9) for a, b in zip(st[1:], st[2:])] == [0.001] * (len(st) - 2)
        assert st[-2]["kv"]["done"] == ["r0:S0"] and res.summary["kv_flushed_jobs"] == 0
    assert res.summary["kv_store_jobs"] == 1 and res.summary["kv_jobs_lost"] == 0


def test_jobs_left_at_the_end_are_an_invariant_violation():
    """0.23.0 without the flush-all rule strands the last store: the run fails, naming it."""
    case = oc.scenario("last_step")
    cfg = config("0.23", num_gpu_blocks=32)
    run_engine(oc.sim_core(case, policy="0.23"), case.specs, cfg, case.plan, side="sim")
    with pytest.raises(InvariantViolation, match=r"1 KV offload jobs never retired .*r0:S0"):
        run_engine(oc.sim_core(case, policy="0.23", mutant="no-flush-all"), case.specs, cfg, case.plan, side="sim")


@pytest.mark.parametrize("mode", [False, True], ids=["sync", "async"])
def test_kill_with_stores_in_flight_names_the_lost_jobs(mode):
    """Sync: the step in flight never returns; async: neither does the batch queued behind it."""
    case = oc.scenario("fence")
    plan = validate_plan({"faults": [{"kind": "kill_engine", "at": 0.012}]}, "kill")
    res = simulate(config(async_scheduling=mode), plan, specs=case.specs)
    (lost,) = [e for e in res.events if e["kind"] == "kv_lost"]
    assert lost == {"kind": "kv_lost", "t": 0.012, "cause": "kill_engine", "jobs": ["r0:S0", "r1:S0"],
                    "unapplied": [1, 2] if mode else [1]}
    assert res.summary["kv_jobs_lost"] == 2 and res.summary["failed"] == 2  # r1 and r2; r0 finished
    killed = steps(res.events)[-1]
    assert killed["t"] + killed["dur"] == pytest.approx(0.012) and "finished" not in killed


def test_failed_transfer_kills_the_engine():
    """vLLM's offloading worker asserts transfer success: the core exits, the client sees it dead."""
    case = oc.scenario("fence")
    plan = validate_plan({"faults": [{"kind": "kv_transfer_fail", "start": 0.0, "end": 0.02}]}, "fail")
    res = simulate(config(), plan, specs=case.specs)
    procs = [e for e in res.events if e["kind"] == "proc"]
    assert [p["event"] for p in procs] == ["exit", "engine_dead"]
    assert procs[0]["cause"] == "kv_transfer_failed" and procs[0]["failed"] == ["r0:S0"]
    (lost,) = [e for e in res.events if e["kind"] == "kv_lost"]
    assert lost["cause"] == "kv_transfer_failed" and "r0:S0" in lost["jobs"]
    assert res.summary["kv_jobs_lost"] == len(lost["jobs"]) and res.summary["finished"] + res.summary["failed"] == 3


def test_slow_transfers_stretch_flush_waits():
    case = oc.scenario("preemption")
    cfg = config(num_gpu_blocks=12)
    fast = simulate(cfg, specs=case.specs).summary["kv_wait_ms"]
    plan = validate_plan({"faults": [{"kind": "kv_transfer_slow", "start": 0.0, "end": 10.0, "factor": 10}]}, "slow")
    slow = simulate(cfg, plan, specs=case.specs).summary["kv_wait_ms"]
    assert fast > 0 and slow > 5 * fast


@pytest.mark.parametrize("section,message", [
    ({"polcy": "0.23"}, "kv_offload: unknown field 'polcy' (fields: policy, blocks_per_chunk"),
    ({"policy": "0.25"}, "kv_offload.policy: must be one of auto, 0.23, 0.24+ (got '0.25')"),
    ({"bandwidth": "25e9"}, "kv_offload.bandwidth: must be a number (got '25e9')"),
    ({"num_cpu_chunks": 0}, "kv_offload.num_cpu_chunks: must be >= 1 (got 0)"),
    ({"offload_prompt_only": 1}, "kv_offload.offload_prompt_only: must be true or false (got 1)"),
    ([1], "kv_offload: must be a mapping (got list [1])"),
])
def test_bad_kv_offload_config_is_one_line(section, message):
    d = {**CONFIG, "kv_offload": section}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(d)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_kv_offload_needs_prefix_caching_and_text():
    with pytest.raises(ConfigError, match="enable_prefix_caching: true"):
        config_from_dict({"kv_offload": {}})
    mm = {"kind": "poisson", "rate": 5, "duration": 2, "prompt": 64, "output": 4,
          "mm": {"fraction": 1.0, "tokens": 16}}
    with pytest.raises(ConfigError, match="text-only"):
        config_from_dict({**CONFIG, "workload": mm})


def test_auto_policy_is_resolved_into_the_header(monkeypatch):
    monkeypatch.setenv(ko.POLICY_ENV, "0.23")
    cfg = config("auto")
    assert cfg.kv_offload["policy"] == "0.23"
    assert "kv_offload" not in config_from_dict({}).to_dict()  # off: the header is as before


def test_cli_run_with_kv_offload_and_a_plan(tmp_path, capsys):
    run = {**CONFIG, "scheduler": {**CONFIG["scheduler"], "num_gpu_blocks": 256},
           "workload": {"kind": "poisson", "rate": 20, "duration": 2, "prompt": 64, "output": 8}, "seed": 3}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(
        {"faults": [{"kind": "kv_transfer_slow", "start": 0.0, "end": 1.0, "factor": 20},
                    {"kind": "kill_engine", "at": 1.5}]}))
    outs = []
    for name in ("a", "b"):
        argv = ["run", "--config", str(tmp_path / "run.yaml"), "--plan", str(tmp_path / "plan.yaml"),
                "--trace", str(tmp_path / f"{name}.jsonl"), "--json"]
        assert main(argv) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["kv_store_jobs"] > 0 and outs[0]["failed"] > 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    header = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert header["config"]["kv_offload"]["policy"] == "0.24+"


def test_a_preempted_prefill_no_longer_reserves_blocks():
    """_inflight_prefill_reserved_blocks counts the prefills in flight; a preempted one holds
    nothing and reserves nothing (the preemption hook drops it)."""
    from vllm_faultsim.harness.workload import RequestSpec
    from vllm_faultsim.models.offload_scheduler import OffloadScheduler
    from vllm_faultsim.models.scheduler import SchedulerConfig
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, block_size=4, num_gpu_blocks=64, async_scheduling=False,
                          max_model_len=2048, enable_prefix_caching=True)
    core = OffloadScheduler(cfg, ko.OffloadConfig(block_size=4), ko.OffloadPolicy("0.24+"))
    core.add_request(RequestSpec("r0", 0.0, 32, 2), 0.0)
    assert core.schedule(0.0).sched == {"r0": 8}
    assert core.kv_connector.inflight_prefill_reserved_blocks() == 8 - 2  # 32 tokens' blocks less the 2 held
    (req,) = core.running
    core.running.remove(req)
    core._preempt_request(req)
    assert core.kv_connector.inflight_prefill_reserved_blocks() == 0
