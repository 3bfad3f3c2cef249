"""``vllm-faultsim fidelity``: a recording replayed through the simulator, compared metric by metric.

A recording made *by the simulator* (its own request times, written in the recording format) must
come back with MAPE ~0 under the step time that made it, and with a large MAPE under a wrong one:
the comparison can fail. Bad recordings are one-line errors (exit 2). One committed real recording
runs end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vllm_faultsim.harness import recording as R
from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.runs import fidelity as F
from vllm_faultsim.harness.runs.simulate import config_from_dict, simulate
from vllm_faultsim.models.request import RequestSpec
from vllm_faultsim.models.step_time import load_profile

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "recordings" / "qwen3-30b-a3b-light.jsonl.gz"
ENGINE = {"max_num_seqs": 8, "max_num_batched_tokens": 512, "max_model_len": 4096, "block_size": 16,
          "enable_prefix_caching": False, "async_scheduling": True, "enforce_eager": False,
          "gpu_memory_utilization": 0.9, "num_gpu_blocks": 2000}


def header(n: int, **changes) -> dict:
    h = {"format": R.FORMAT, "model": "llama-3.1-8b", "gpu": "NVIDIA H200", "tensor_parallel_size": 1,
         "dtype": "bfloat16", "vllm": "0.26.0", "torch": "2.11.0+cu130", "driver": "580", "device": "test",
         "entry_point": "test", "workload": {"rate": 5.0, "n": n, "prompt_tokens": [32, 300],
                                             "output_tokens": [2, 40], "seed": 1},
         "engine": dict(ENGINE)}
    h.update(changes)
    return h


def sim_made_recording(tmp_path: Path, profile: str = "default") -> Path:
    """Requests simulated with `profile` (linear step time), written as a recording with steps."""
    specs = tuple(RequestSpec(f"q{i}", round(0.05 * i, 6), 32 + 37 * i % 260, 2 + 7 * i % 38) for i in range(40))
    sched = {k: ENGINE[k] for k in F.SCHEDULER_ARGS if k in ENGINE}
    cfg = config_from_dict({"scheduler": sched, "profile": profile,
                            "workload": {"kind": "poisson", "rate": 1, "duration": 1, "prompt": 8, "output": 2}})
    res = simulate(cfg, specs=specs)
    reqs = {e["req"]: e for e in res.events if e["kind"] == "req"}
    requests = [{"id": s.req_id, "arrival": s.arrival, "prompt_tokens": s.prompt_len, "output_tokens": s.output_len,
                 "first_token": reqs[s.req_id]["first_token"], "finish": reqs[s.req_id]["finish"]} for s in specs]
    # two recorded steps, their measured time = the linear model's on their shape (synchronous spacing)
    lin = load_profile(profile)
    shapes = [(1, 200, 0, 3, 900), (0, 0, 0, 8, 4000)]
    steps, t = [], 0.001
    for i, (npf, spt, spkv, nd, dkv) in enumerate(shapes):
        dur = lin.batch_seconds((npf, spt, spkv, nd, dkv))
        steps.append({"i": i, "num_prefill_requests": npf, "sum_prefill_tokens": spt, "sum_prefill_kv_tokens": spkv,
                      "num_decode_requests": nd, "sum_decode_kv_tokens": dkv, "total_tokens": spt + nd,
                      "schedule_start": t, "schedule_end": t, "output_start": t + dur, "output_end": t + dur})
        t += dur
    return R.write(tmp_path / "simmade.jsonl.gz", R.Recording(header(len(requests)), requests, steps))


def test_replaying_the_simulators_own_run_gives_near_zero_error(tmp_path):
    path = sim_made_recording(tmp_path)
    f = F.fidelity(path, {"profile": "default"})
    for metric in ("ttft", "tpot", "e2e", "step"):
        assert f.metrics[metric]["n"] > 0
        assert f.metrics[metric]["mape_pct"] < 0.5, (metric, f.metrics[metric])
    assert f.metrics["e2e"]["n"] == 40 and f.metrics["step"]["n"] == 2


def test_a_wrong_step_time_makes_the_mape_large(tmp_path):
    path = sim_made_recording(tmp_path)
    good = json.loads((ROOT / "src" / "vllm_faultsim" / "profiles" / "default.json").read_text())
    wrong = copy.deepcopy(good)
    wrong["coeffs"] = {k: 3 * v for k, v in good["coeffs"].items()}  # every step 3x as long
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    f = F.fidelity(path, {"profile": str(tmp_path / "wrong.json")})
    assert f.metrics["tpot"]["mape_pct"] > 100 and f.metrics["tpot"]["bias_pct"] > 100
    assert f.metrics["e2e"]["mape_pct"] > 100
    assert f.metrics["step"]["mape_pct"] == pytest.approx(200, rel=1e-3)


def test_cli_writes_numbers_trace_and_says_where(tmp_path, capsys):
    path = sim_made_recording(tmp_path)
    cfg = tmp_path / "over.yaml"
    cfg.write_text("profile: default\n")
    rc = main(["fidelity", str(path), "--config", str(cfg), "--json", str(tmp_path / "f.json"),
               "--trace", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "pics")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "MAPE%" in out and "TTFT" in out and "step time" in out
    assert ("plot: " + str(tmp_path / "pics" / "simmade.png")) in out or "plot: skipped (matplotlib not installed" in out
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc[0]["metrics"]["e2e"]["mape_pct"] < 0.5
    assert doc[0]["config"]["scheduler"]["max_num_seqs"] == 8  # from the header's engine arguments
    from vllm_faultsim.harness.trace import read_trace
    events = read_trace(tmp_path / "t.jsonl")
    assert sum(e["kind"] == "req" for e in events) == 40 and any(e["kind"] == "step" for e in events)


def test_header_engine_arguments_become_the_scheduler_section(tmp_path):
    path = sim_made_recording(tmp_path)
    f = F.fidelity(path, {"profile": "default", "scheduler": {"max_num_seqs": 2}})
    s = f.config.scheduler
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.num_gpu_blocks, s.async_scheduling) == (2, 512, 2000, True)
    assert f.metrics["e2e"]["mape_pct"] > 1  # fewer seqs than the run had: not the same run any more


def _bad(tmp_path: Path, mutate) -> Path:
    rec = R.Recording(header(1), [{"id": "a", "arrival": 0.5, "prompt_tokens": 10, "output_tokens": 2,
                                   "first_token": 0.51, "finish": 0.52}])
    lines = [{"kind": "header", **rec.header}] + [{"kind": "request", **r} for r in rec.requests]
    lines = mutate(lines)
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(o) + "\n" for o in lines))
    return p


def _set(i, key, value):
    def f(lines):
        lines[i][key] = value
        return lines
    return f


@pytest.mark.parametrize("mutate, needle", [
    (lambda lines: lines[1:], "the first line must be the header"),
    (_set(0, "gpu", "NVIDIA Z9000"), "unknown GPU"),
    (_set(0, "model", "no-such-model"), "unknown model"),
    (_set(1, "finish", 0.505), "before first_token"),
    (lambda lines: lines + [{"kind": "request", "id": "b", "arrival": 0.2, "prompt_tokens": 3, "output_tokens": 1,
                             "first_token": 0.3, "finish": 0.3}], "before the previous request's"),
])
def test_bad_recordings_are_one_line_errors(tmp_path, capsys, mutate, needle):
    rc = main(["fidelity", str(_bad(tmp_path, mutate)), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and needle in err and err.startswith("vllm-faultsim: error: ")


def test_a_committed_real_recording_runs(tmp_path):
    f = F.fidelity(COMMITTED)
    rec = R.read(COMMITTED)
    assert f.metrics["e2e"]["n"] == len(rec.requests) and f.metrics["step"]["n"] == len(rec.steps)
    for metric in ("ttft", "tpot", "e2e", "step"):
        m = f.metrics[metric]
        assert m["mape_pct"] >= 0 and m["meas_p50_ms"] > 0 and m["pred_p50_ms"] > 0
    assert f.config.scheduler.max_num_batched_tokens == rec.header["engine"]["max_num_batched_tokens"]


def test_serving_costs_delay_outputs_and_a_fit_finds_the_recorded_ones(tmp_path):
    base = {"workload": {"kind": "poisson", "rate": 20, "duration": 3, "prompt": 256, "output": 32}, "seed": 3}
    plain = simulate(config_from_dict(base)).summary
    zero = simulate(config_from_dict({**base, "serving": {"schedule_base_s": 0, "update_base_s": 0}})).summary
    assert zero == plain  # costs of 0: the same run
    hidden = simulate(config_from_dict({**base, "serving": {"schedule_base_s": 0.002, "update_base_s": 0.001}})).summary
    assert abs(hidden["tpot_p50_ms"] - plain["tpot_p50_ms"]) < 0.5  # async scheduling overlaps it with the forward
    slow = simulate(config_from_dict({**base, "serving": {"schedule_base_s": 0.012, "update_base_s": 0.004}})).summary
    assert slow["tpot_p50_ms"] > plain["tpot_p50_ms"] + 4 and slow["finished"] == plain["finished"]  # CPU-bound
    from vllm_faultsim.harness.runs.simulate import ConfigError
    with pytest.raises(ConfigError, match="async scheduling only"):
        config_from_dict({**base, "scheduler": {"async_scheduling": False}, "serving": {"update_base_s": 0.001}})
    path = sim_made_recording(tmp_path)
    fitted = F.fit([path], {"profile": "default"})
    assert set(fitted["step_time"]) == {"decode_scale"} and fitted["step_time"]["decode_scale"] == 1  # no sample
    assert fitted["serving"]["schedule_base_s"] == 0 and fitted["serving"]["update_base_s"] == 0  # recorded as 0


def test_the_cudagraph_runtime_mode_is_vllms_dispatch():
    from vllm_faultsim.harness.runs.simulate import config_from_dict as cfd
    from vllm_faultsim.models.step_time import max_cudagraph_capture_size, serving_costs
    assert max_cudagraph_capture_size(64, 8192) == 128 and max_cudagraph_capture_size(1024, 8192) == 512
    assert max_cudagraph_capture_size(1024, 256) == 256
    sched = cfd({"scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": 8192}}).scheduler
    c = serving_costs({"num_hidden_layers": 10, "execute_base_s": 0.001, "piecewise_per_layer_s": 0.0002,
                       "eager_per_layer_s": 0.002}, sched)
    assert (c.runtime_mode(64, 64), c.runtime_mode(65, 65), c.runtime_mode(3, 100), c.runtime_mode(3, 129)) == \
        ("FULL", "PIECEWISE", "PIECEWISE", "NONE")  # FULL: uniform decode <= max_num_seqs; else <= 128 tokens
    assert (c.execute_seconds(8, 8), c.execute_seconds(2, 100), c.execute_seconds(2, 700)) == \
        pytest.approx((0.001, 0.003, 0.021))
    eager = serving_costs({"cudagraph_mode": "NONE"}, sched)
    assert eager.runtime_mode(4, 4) == "NONE"


def launch_bound_recording(tmp_path: Path) -> Path:
    """Decode steps of 2 ms with every fifth a 300-token prefill whose eager launch takes 20 ms:
    the step before it gives its output only after that launch (vLLM's step_with_batch_queue)."""
    steps, t, out_prev = [], 0.0, 0.0
    shapes = [(1, 300, 0, 7, 3000) if i % 5 == 4 else (0, 0, 0, 8, 3000) for i in range(40)]
    launch = [0.020 if s[0] else 0.0005 for s in shapes]
    gpu = [0.002] * len(shapes)
    se = [0.0] * len(shapes)
    os_ = [0.0] * len(shapes)
    cpu, gpu_free = 0.0, 0.0
    for k in range(len(shapes)):
        se[k] = cpu
        end = max(max(gpu_free, cpu) + gpu[k], cpu + launch[k])
        cpu += launch[k]
        gpu_free = end
        os_[k] = end
        if k:
            os_[k - 1] = max(os_[k - 1], cpu)
            cpu = os_[k - 1]
    for i, (npf, spt, spkv, nd, dkv) in enumerate(shapes):
        steps.append({"i": i, "num_prefill_requests": npf, "sum_prefill_tokens": spt, "sum_prefill_kv_tokens": spkv,
                      "num_decode_requests": nd, "sum_decode_kv_tokens": dkv, "total_tokens": spt + nd,
                      "schedule_start": se[i], "schedule_end": se[i], "output_start": os_[i], "output_end": os_[i]})
    rec = R.Recording(header(1), [{"id": "a", "arrival": 0.0, "prompt_tokens": 10, "output_tokens": 2,
                                   "first_token": 0.01, "finish": 0.02}], steps)
    return R.write(tmp_path / "launch.jsonl", rec)


def test_the_step_replay_needs_the_launch_and_the_fit_finds_it(tmp_path):
    """The replayed steps match a recording made with launch costs only with those costs (the model
    without them, a broken clock, misses the steps that wait behind an eager launch by ~10x)."""
    from vllm_faultsim.harness.runs.simulate import config_from_dict as cfd
    from vllm_faultsim.models.step_time import LinearStepTime, serving_costs
    rec = R.read(launch_bound_recording(tmp_path))
    sched = cfd({"scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 512}}).scheduler
    gpu = LinearStepTime(0.002, 0, 0, 0)
    meas = [m for _, m in F.measured_step_times(rec)]
    right = serving_costs({"execute_base_s": 0.0005, "eager_per_layer_s": 0.0195, "num_hidden_layers": 1}, sched)
    assert right.runtime_mode(8, 300 + 7) == "NONE"
    good = F.error_stats(F.predicted_step_times(rec, gpu, right), meas)
    bad = F.error_stats(F.predicted_step_times(rec, gpu, serving_costs({}, sched)), meas)
    assert good["mape_pct"] < 0.5 and bad["mape_pct"] > 30, (good, bad)
    fitted = F.launch_costs(*_launch_fit_inputs(rec, right))
    assert fitted["execute_base_s"] == pytest.approx(0.0005, abs=2e-4)
    assert fitted["eager_per_layer_s"] == pytest.approx(0.0195, abs=2e-4)


def _launch_fit_inputs(rec, costs):
    full, piecewise, eager = [{}], [], [[]]
    for mode, n, x, behind in F.launch_samples(rec, costs):
        if mode == "FULL":
            full[0].setdefault(n // F.LAUNCH_BIN, []).append(x)
        elif behind == "FULL" and mode == "PIECEWISE":
            piecewise.append((n, costs.num_hidden_layers, x))
        elif behind == "FULL":
            eager[0].append((n, costs.num_hidden_layers - costs.num_moe_layers, costs.num_moe_layers, x))
    return full, piecewise, eager


def test_moe_layers_follow_vllms_model_code():
    assert F.moe_layers({"num_hidden_layers": 16}) == 0  # dense Llama
    assert F.moe_layers({"num_hidden_layers": 48, "num_experts": 128, "decoder_sparse_step": 1,
                         "mlp_only_layers": []}) == 48  # Qwen3-30B-A3B
    assert F.moe_layers({"num_hidden_layers": 8, "num_experts": 4, "decoder_sparse_step": 2,
                         "mlp_only_layers": [3]}) == 3  # layers 1, 5, 7 (3 is dense)
    assert F.moe_layers({"num_hidden_layers": 61, "n_routed_experts": 256, "first_k_dense_replace": 3}) == 58
    assert F.moe_layers({"num_hidden_layers": 32, "num_local_experts": 8}) == 32  # Mixtral


def test_eager_launch_costs_split_by_layer_kind_and_carry_to_a_mixed_model():
    """Per-recording eager excess of a dense and a MoE model gives each kind's cost; a model with
    both kinds is predicted from them; with dense models only, a MoE layer costs a dense one."""
    dense, moe = F.layer_costs([(16, 0, 16 * 0.0006), (32, 0, 32 * 0.0006), (0, 48, 48 * 0.0017)])
    assert (dense, moe) == (pytest.approx(0.0006), pytest.approx(0.0017))
    assert F.layer_costs([(16, 0, 0.0096), (32, 0, 0.0192)]) == (pytest.approx(0.0006), pytest.approx(0.0006))
    assert F.layer_costs([(3, 58, 3 * 0.0006 + 58 * 0.0017), (32, 0, 32 * 0.0006)]) == \
        (pytest.approx(0.0006), pytest.approx(0.0017))
    from vllm_faultsim.harness.runs.simulate import config_from_dict as cfd
    from vllm_faultsim.models.step_time import ProfileError, check_serving, serving_costs
    sched = cfd({"scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": 8192}}).scheduler
    c = serving_costs({"num_hidden_layers": 61, "num_moe_layers": 58, "eager_per_layer_s": 0.0006,
                       "eager_per_moe_layer_s": 0.0017}, sched)
    assert c.execute_seconds(2, 700) == pytest.approx(3 * 0.0006 + 58 * 0.0017)
    with pytest.raises(ProfileError, match="num_moe_layers must be <= num_hidden_layers"):
        check_serving({"num_hidden_layers": 4, "num_moe_layers": 5})


def test_the_request_path_costs_are_found_from_client_times():
    """input_s: the value inside the most (lo, hi] bounds; the output path: a line through bin
    medians of (requests in the step, delay)."""
    bounds = [(0.0009 - 0.0001 * (i % 5), 0.0011 + 0.002 * (i % 7)) for i in range(200)] + [(float("-inf"), 0.003)]
    assert F.input_seconds(bounds) == pytest.approx(0.001, abs=1e-4)
    assert F.input_seconds([(0.0012, 0.0012)] * 3) == pytest.approx(0.0012, abs=1e-5)  # lo = hi
    samples = [(n, 0.001 + 4e-5 * n + (1e-4 if i % 2 else -1e-4)) for i in range(6) for n in range(1, 64)]
    a, b = F.output_costs(samples)
    assert a == pytest.approx(0.001, abs=5e-5) and b == pytest.approx(4e-5, rel=0.05)


def test_first_scheduled_replays_fcfs_prefills_and_gives_up_when_the_sums_disagree(tmp_path):
    def step(i, npf, spt, nd=0):
        t = 0.01 * i
        return {"i": i, "num_prefill_requests": npf, "sum_prefill_tokens": spt, "sum_prefill_kv_tokens": 0,
                "num_decode_requests": nd, "sum_decode_kv_tokens": 0, "total_tokens": spt + nd,
                "schedule_start": t, "schedule_end": t, "output_start": t + 0.005, "output_end": t + 0.005}
    reqs = [{"id": f"r{j}", "arrival": 0.001 * j, "prompt_tokens": p, "output_tokens": 2, "first_token": 0.05,
             "finish": 0.09} for j, p in enumerate((100, 300, 50))]
    steps = [step(0, 2, 100 + 200), step(1, 2, 100 + 50, 1), step(2, 0, 0, 3)]  # r1 chunked over steps 0-1
    rec = R.Recording(header(3), reqs, steps)
    assert F.first_scheduled(rec) == [0, 0, 1]
    rec.steps = [step(0, 2, 100 + 150), step(1, 1, 200, 1)]  # r1 had 150 left: the sums disagree
    assert F.first_scheduled(rec) == [None, None, None]


def test_recorded_request_ids_and_engine_times_are_used_where_present():
    """r2's optional fields: a step's new_reqs give the first schedule, first_token_reqs /
    finished_reqs the step whose output carried a token, stats.queued_ts (Scheduler.add_request)
    an upper bound of the input path."""
    def step(i, new, first, fin, n):
        t = 0.01 * i
        return {"i": i, "num_prefill_requests": 0, "sum_prefill_tokens": 0, "sum_prefill_kv_tokens": 0,
                "num_decode_requests": n, "sum_decode_kv_tokens": 0, "total_tokens": n, "schedule_start": t,
                "schedule_end": t, "output_start": t + 0.004, "output_end": t + 0.005, "new_reqs": new,
                "first_token_reqs": first, "finished_reqs": fin}
    reqs = [{"id": "a", "arrival": 0.0, "prompt_tokens": 10, "output_tokens": 2, "first_token": 0.0071,
             "finish": 0.0171, "stats": {"arrival_time": 0.0, "queued_ts": 0.0012, "scheduled_ts": 0.0,
                                         "first_token_ts": 0.0, "last_token_ts": 0.0}},
            {"id": "b", "arrival": 0.001, "prompt_tokens": 10, "output_tokens": 2, "first_token": 0.0272,
             "finish": 0.0372}]
    rec = R.Recording(header(2), reqs, [step(0, [0], [0], [], 1), step(1, [1], [], [0], 2), step(2, [], [1], [], 1),
                                        step(3, [], [], [1], 1)])
    assert F.first_scheduled(rec) == [0, 1]
    # the steps before their first do not say they left nothing waiting: upper bounds only
    assert F.input_bounds(rec) == [(float("-inf"), 0.0012), (float("-inf"), pytest.approx(0.009))]
    assert F.output_samples(rec) == [(1, pytest.approx(0.0021)), (2, pytest.approx(0.0021)),
                                     (1, pytest.approx(0.0022)), (1, pytest.approx(0.0022))]


def test_the_request_path_delays_first_tokens_and_finishes():
    """A lone request on an idle engine: its first token and finish come input_s + the output path
    later than without them (models/engine.py: the core sees it input_s after the client sent
    it; the client has each step's tokens ServingCosts.output after update_from_output)."""
    from vllm_faultsim.models.request import RequestSpec as Spec
    base = {"workload": {"kind": "poisson", "rate": 1, "duration": 1, "prompt": 8, "output": 2}, "profile": "default"}
    spec = (Spec("a", 0.5, 64, 4),)
    ev = lambda serving: next(e for e in simulate(config_from_dict({**base, "serving": serving}), specs=spec).events
                              if e["kind"] == "req")  # noqa: E731
    plain = ev({"num_hidden_layers": 1})
    path = ev({"num_hidden_layers": 1, "input_s": 0.004, "output_base_s": 0.002, "output_per_req_s": 0.0005})
    assert path["arrival"] == plain["arrival"] == 0.5
    assert path["first_token"] - plain["first_token"] == pytest.approx(0.004 + 0.0025, abs=1e-9)
    assert path["finish"] - plain["finish"] == pytest.approx(0.004 + 0.0025, abs=1e-9)


def test_the_output_handler_delivers_a_step_by_chunks_of_128():
    """AsyncLLM's output_handler processes a step's outputs 128 at a time (VLLM_V1_OUTPUT_PROC_CHUNK_SIZE)
    and yields to the clients between chunks: a request waits for its chunk and those before it."""
    from vllm_faultsim.models.request import RequestSpec as Spec
    from vllm_faultsim.models.step_time import output_requests_before
    assert [output_requests_before(k, 300) for k in (0, 127, 128, 255, 256, 299)] == [128, 128, 256, 256, 300, 300]
    assert output_requests_before(99, 100) == 100
    base = {"workload": {"kind": "poisson", "rate": 1, "duration": 1, "prompt": 8, "output": 2}, "profile": "default",
            "scheduler": {"max_num_seqs": 256, "max_num_batched_tokens": 8192}}
    specs = tuple(Spec(f"r{k:03d}", 0.0, 8, 3) for k in range(200))  # one step admits all 200, in arrival order
    cfg = config_from_dict({**base, "serving": {"num_hidden_layers": 1, "output_per_req_s": 0.0001}})
    reqs = {e["req"]: e for e in simulate(cfg, specs=specs).events if e["kind"] == "req"}
    first = [reqs[s.req_id]["first_token"] for s in specs]
    assert len(set(first[:128])) == len(set(first[128:])) == 1  # the step's two chunks
    assert first[128] - first[0] == pytest.approx(0.0001 * (200 - 128), abs=1e-9)


def test_the_fit_reads_each_output_by_its_chunk():
    """output_samples: a request's position in a step's outputs is its admission rank among the
    running requests; the requests processed before its client has it, its chunk's end."""
    def step(i, n, new, first, fin):
        t = 0.01 * i
        return {"i": i, "num_prefill_requests": len(new), "sum_prefill_tokens": 10 * len(new), "sum_prefill_kv_tokens": 0,
                "num_decode_requests": n - len(new), "sum_decode_kv_tokens": 0, "total_tokens": n,
                "schedule_start": t, "schedule_end": t, "output_start": t + 0.004, "output_end": t + 0.005,
                "new_reqs": new, "first_token_reqs": first, "finished_reqs": fin}
    n = 130
    reqs = [{"id": f"r{j}", "arrival": 0.0, "prompt_tokens": 10, "output_tokens": 2, "first_token": 0.007,
             "finish": 0.017} for j in range(n)]
    rec = R.Recording(header(n), reqs, [step(0, n, list(range(n)), list(range(n)), []),
                                        step(1, n, [], [], list(range(n)))])
    out = F.output_samples(rec)
    assert [m for m, _ in out[:4]] == [128, 128, 128, 128] and [m for m, _ in out[-4:]] == [130] * 4


def test_a_launch_delays_the_outputs_it_precedes():
    """In the simulator: a forward ends no earlier than its launch (ServingCosts.execute)."""
    base = {"workload": {"kind": "poisson", "rate": 20, "duration": 3, "prompt": 256, "output": 32}, "seed": 3,
            "scheduler": {"max_num_seqs": 64}}
    plain = simulate(config_from_dict({**base, "serving": {"num_hidden_layers": 32}})).summary
    eager = simulate(config_from_dict({**base, "serving": {"num_hidden_layers": 32,
                                                          "eager_per_layer_s": 0.003}})).summary
    # a 256-token prompt (> max_cudagraph_capture_size 128) runs eagerly: its first token >= 96 ms
    assert plain["ttft_p50_ms"] < 40 and eager["ttft_p50_ms"] > 96 and eager["finished"] == plain["finished"]


def test_cli_fit_reports_held_out_or_not(tmp_path, capsys):
    path = sim_made_recording(tmp_path)
    cfg = tmp_path / "over.yaml"
    cfg.write_text("profile: default\n")
    assert main(["fidelity", str(path), "--fit", str(path), "--config", str(cfg), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 1 recording(s) (simmade; step time: those of llama-3.1-8b)" in out and "not held out" in out


def test_decode_scale_per_batch_size():
    """A decode_scale list corrects a decode-only batch by its size (DECODE_BIN requests an entry,
    the last for larger ones); prefill batches take ``scale``; a bad list is a one-line error."""
    from vllm_faultsim.models.step_time import DECODE_BIN, ProfileError, check_section, from_config
    base = load_profile("default")
    m = from_config({"backend": "linear", "profile": "default", "decode_scale": [2.0, 1.5, 1.0]})
    for n, k in ((1, 2.0), (DECODE_BIN - 1, 2.0), (DECODE_BIN, 1.5), (2 * DECODE_BIN + 3, 1.0), (500, 1.0)):
        shape = (0, 0, 0, n, 100 * n)
        assert m.batch_seconds(shape) == pytest.approx(k * base.batch_seconds(shape))
    assert m.batch_seconds((1, 64, 0, 3, 300)) == pytest.approx(base.batch_seconds((1, 64, 0, 3, 300)))
    for bad in ([], [1.0, 0], [True], ["1"]):
        with pytest.raises(ProfileError, match="step_time.decode_scale: must be a number > 0 or a non-empty list"):
            check_section({"backend": "linear", "decode_scale": bad})


def test_the_decode_correction_comes_from_the_replayed_models_recordings_only():
    """Qwen3's recorded decode steps correct aiconfigurator's Qwen3 data (1.2-1.4x at small batches),
    not another model's: a fit for another model leaves its step time uncorrected."""
    pytest.importorskip("aiconfigurator_core")
    near = COMMITTED.parent / "qwen3-30b-a3b-near.jsonl.gz"
    own = F.fit([near], model="qwen3-30b-a3b")["step_time"]["decode_scale"]
    assert isinstance(own, list) and own[0] > 1.1 and own[-1] < own[0]
    assert F.fit([near], model="llama-3.1-8b")["step_time"]["decode_scale"] == 1.0


def test_serving_costs_scale_to_the_replayed_runs_cpu_speed(tmp_path):
    """cpu_speed: the recorded schedule() times over the fitted line; at_cpu_speed scales every
    serving cost by the replayed run's speed over the fit runs' (a run 1.5x as slow: costs x1.5)."""
    serving = {"schedule_base_s": 1e-4, "schedule_per_req_s": 1e-5, "execute_base_s": 0.002, "input_s": 0.001}

    def rec(slow: float) -> R.Recording:
        steps = []
        for i in range(20):
            n, t = 1 + i % 8, 0.01 * i
            d = slow * (1e-4 + 1e-5 * n)
            steps.append({"i": i, "num_prefill_requests": 0, "sum_prefill_tokens": 0, "sum_prefill_kv_tokens": 0,
                          "num_decode_requests": n, "sum_decode_kv_tokens": 100 * n, "total_tokens": n,
                          "schedule_start": t, "schedule_end": t + d, "output_start": t + 0.005, "output_end": t + 0.005})
        return R.Recording(header(1), [{"id": "a", "arrival": 0.0, "prompt_tokens": 10, "output_tokens": 2,
                                        "first_token": 0.3, "finish": 0.4}], steps)
    assert F.cpu_speed(rec(2.0), serving) == pytest.approx(2.0)
    fit_on, held = R.write(tmp_path / "fit.jsonl", rec(1.0)), R.write(tmp_path / "held.jsonl", rec(1.5))
    scaled = F.at_cpu_speed({"serving": serving, "step_time": {"decode_scale": 1.0}}, [fit_on], held)
    assert scaled["serving"] == {k: pytest.approx(1.5 * v, rel=1e-3) for k, v in serving.items()}
    assert scaled["step_time"] == {"decode_scale": 1.0}


def test_cli_cpu_speed_scales_the_fit_to_the_replayed_run(tmp_path, capsys):
    """``fidelity --fit REC --cpu-speed``: the fitted costs times the replayed run's schedule() speed
    over the fit's, said in one line; without --fit, or on a recording without step lines, a
    one-line error, exit 2."""
    path = sim_made_recording(tmp_path)
    cfg = tmp_path / "over.yaml"
    cfg.write_text("profile: default\n")
    assert main(["fidelity", str(path), "--fit", str(path), "--cpu-speed", "--config", str(cfg),
                 "--out", str(tmp_path)]) == 0
    assert "  simmade: serving costs x1.000 (its schedule() times against the fit recordings')" in \
        capsys.readouterr().out
    assert main(["fidelity", str(path), "--cpu-speed", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cpu-speed scales costs fitted on other recordings: it needs --fit" in err[0]
    rec = R.read(path)
    bare = R.write(tmp_path / "bare.jsonl", R.Recording(rec.header, rec.requests, []))
    assert main(["fidelity", str(bare), "--fit", str(path), "--cpu-speed", "--config", str(cfg),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bare.jsonl: --cpu-speed: no step lines" in err[0]
