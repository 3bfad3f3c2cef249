"""The vllm-faultsim.recording/1 format: a good recording round-trips (plain and gzip); each kind of
bad input raises RecordingError with one line naming the file, the line, the field and the value."""

from __future__ import annotations

import copy
import gzip
import json
import re

import pytest

from vllm_faultsim.harness import recording as R


def good() -> R.Recording:
    header = {
        "format": R.FORMAT, "model": "llama-3.1-8b", "gpu": "NVIDIA H200", "tensor_parallel_size": 1,
        "dtype": "bfloat16", "vllm": "0.26.0", "torch": "2.11.0+cu130", "driver": "580.159.04",
        "device": "1x NVIDIA H200 (143771 MiB), 16 CPUs", "entry_point": "AsyncLLM.from_vllm_config",
        "workload": {"rate": 2.5, "n": 2, "prompt_tokens": [64, 1024], "output_tokens": [16, 256],
                     "seed": 7, "load": "light"},
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 8192, "max_model_len": 131072,
                   "block_size": 16, "enable_prefix_caching": True, "async_scheduling": True,
                   "enforce_eager": False, "gpu_memory_utilization": 0.9, "num_gpu_blocks": 50000},
        "extra_key": {"kept": True},
    }
    requests = [
        {"id": "r0", "arrival": 0.0, "prompt_tokens": 100, "output_tokens": 3, "first_token": 0.02, "finish": 0.05,
         "stats": {"arrival_time": 0.0003, "queued_ts": 0.0008, "scheduled_ts": 0.001, "first_token_ts": 0.0195,
                   "last_token_ts": 0.049}},
        {"id": "r1", "arrival": 0.01, "prompt_tokens": 64, "output_tokens": 1, "first_token": 0.03, "finish": 0.03},
    ]
    steps = [  # async: step 1 is scheduled before step 0's output is processed
        {"i": 5, "num_prefill_requests": 1, "sum_prefill_tokens": 100, "sum_prefill_kv_tokens": 0,
         "num_decode_requests": 0, "sum_decode_kv_tokens": 0, "total_tokens": 100,
         "schedule_start": 0.001, "schedule_end": 0.0012, "output_start": 0.019, "output_end": 0.0195,
         "num_waiting": 0, "num_running": 1, "new_reqs": [0], "first_token_reqs": [], "finished_reqs": []},
        {"i": 6, "num_prefill_requests": 1, "sum_prefill_tokens": 64, "sum_prefill_kv_tokens": 0,
         "num_decode_requests": 1, "sum_decode_kv_tokens": 100, "total_tokens": 65,
         "schedule_start": 0.0125, "schedule_end": 0.0127, "output_start": 0.029, "output_end": 0.0293,
         "new_reqs": [1], "first_token_reqs": [0, 1], "finished_reqs": [1]},
    ]
    return R.Recording(header=header, requests=requests, steps=steps)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_round_trip(tmp_path, suffix):
    rec = good()
    path = R.write(tmp_path / f"run{suffix}", rec)
    raw = path.read_bytes()
    assert (raw[:2] == R.GZIP_MAGIC) == suffix.endswith(".gz")
    back = R.read(path)
    assert back.header == {"kind": "header", **rec.header}
    assert [{k: v for k, v in r.items() if k != "kind"} for r in back.requests] == rec.requests
    assert [{k: v for k, v in s.items() if k != "kind"} for s in back.steps] == rec.steps
    s = R.summary(back)
    assert s["n"] == 2 and s["steps"] == 2
    assert s["ttft_p50"] == pytest.approx(0.02)
    assert s["tpot_p50"] == pytest.approx(0.015)  # only r0 has more than one token
    assert s["e2e_p50"] == pytest.approx((0.05 + 0.02) / 2)


def test_gzip_detected_by_magic_not_name(tmp_path):
    plain = R.write(tmp_path / "a.jsonl", good())
    disguised = tmp_path / "b.jsonl"
    disguised.write_bytes(gzip.compress(plain.read_bytes()))
    assert R.read(disguised).header["model"] == "llama-3.1-8b"


def test_steps_are_optional_and_times_rounded(tmp_path):
    rec = good()
    rec.steps = []
    rec.requests[0]["finish"] = 0.0500000004
    back = R.read(R.write(tmp_path / "x.jsonl", rec))
    assert back.steps == [] and back.requests[0]["finish"] == 0.05


def _lines(rec: R.Recording) -> list[dict]:
    return list(R._objects(rec))


def _write_raw(tmp_path, objs, text_override=None) -> str:
    p = tmp_path / "bad.jsonl"
    body = text_override if text_override is not None else "".join(json.dumps(o) + "\n" for o in objs)
    p.write_text(body)
    return str(p)


def _mutate(fn):
    objs = _lines(good())
    fn(objs)
    return objs


BAD = {
    # name: (mutation of the line list, line number, the message after "FILE:LINE: ")
    "no header": (lambda o: o.pop(0), 1, "kind: the first line must be the header (got 'request')"),
    "wrong format": (lambda o: o[0].update(format="vllm-faultsim.recording/2"), 1,
                     "format: must be one of vllm-faultsim.recording/1 (got 'vllm-faultsim.recording/2')"),
    "missing model": (lambda o: o[0].pop("model"), 1, "missing field 'model'"),
    "tp not int": (lambda o: o[0].update(tensor_parallel_size="1"), 1, "tensor_parallel_size: must be an integer (got '1')"),
    "engine field missing": (lambda o: o[0]["engine"].pop("num_gpu_blocks"), 1, "engine: missing field 'num_gpu_blocks'"),
    "engine bool ill-typed": (lambda o: o[0]["engine"].update(async_scheduling=1), 1,
                              "engine.async_scheduling: must be true or false (got 1)"),
    "engine count zero": (lambda o: o[0]["engine"].update(max_num_seqs=0), 1, "engine.max_num_seqs: must be >= 1 (got 0)"),
    "workload range": (lambda o: o[0]["workload"].update(prompt_tokens=[1024, 64]), 1,
                       "workload.prompt_tokens: must be [lo, hi] with lo <= hi (got [1024, 64])"),
    "n mismatch": (lambda o: o[0]["workload"].update(n=3), 1, "workload.n: the file has 2 request lines (got 3)"),
    "request id missing": (lambda o: o[1].pop("id"), 2, "missing field 'id'"),
    "request field unknown": (lambda o: o[1].update(first_tokn=0.02), 2,
                              ("unknown field 'first_tokn' (fields: kind, id, arrival, prompt_tokens, output_tokens, "
                               "first_token, finish, stats)")),
    "tokens ill-typed": (lambda o: o[2].update(output_tokens=2.0), 3, "output_tokens: must be an integer (got 2.0)"),
    "bool as int": (lambda o: o[2].update(prompt_tokens=True), 3, "prompt_tokens: must be an integer (got bool True)"),
    "non-finite": (lambda o: o[1].update(finish=float("inf")), 2, "finish: must be finite (got inf)"),
    "nan": (lambda o: o[1].update(first_token=float("nan")), 2, "first_token: must be finite (got nan)"),
    "negative": (lambda o: o[1].update(arrival=-0.5), 2, "arrival: must be >= 0 (got -0.5)"),
    "first token before arrival": (lambda o: o[2].update(first_token=0.005), 3, "first_token: before arrival 0.01 (got 0.005)"),
    "finish before first token": (lambda o: o[1].update(finish=0.01), 2, "finish: before first_token 0.02 (got 0.01)"),
    "arrivals out of order": (lambda o: (o[1].update(arrival=0.02, first_token=0.02), o[2].update(arrival=0.01)), 3,
                              "arrival: before the previous request's 0.02 (got 0.01)"),
    "duplicate id": (lambda o: o[2].update(id="r0"), 3, "id: duplicate request id (got 'r0')"),
    "step field missing": (lambda o: o[3].pop("sum_prefill_kv_tokens"), 4, "missing field 'sum_prefill_kv_tokens'"),
    "step shape disagrees": (lambda o: o[4].update(total_tokens=64), 5,
                             "total_tokens: != sum_prefill_tokens + num_decode_requests = 65 (got 64)"),
    "step times backwards within": (lambda o: o[3].update(output_start=0.001), 4,
                                    "output_start: before schedule_end 0.0012 (got 0.001)"),
    "step scheduled before previous": (lambda o: o[4].update(schedule_start=0.0005), 5,
                                       "schedule_start: before the previous step's 0.001 (got 0.0005)"),
    "step processed before previous": (lambda o: o[4].update(output_start=0.015, output_end=0.016), 5,
                                       "output_end: before the previous step's 0.0195 (got 0.016)"),
    "step index not increasing": (lambda o: o[4].update(i=5), 5, "i: not after the previous step's 5 (got 5)"),
    "request after step": (lambda o: o.append(dict(o[1], id="r9")), 6, "kind: requests must come before steps (got 'request')"),
    "unknown kind": (lambda o: o[3].update(kind="stepp"), 4, "kind: must be header, request or step (got 'stepp')"),
    "optional step field ill-typed": (lambda o: o[3].update(num_waiting="3"), 4, "num_waiting: must be an integer (got '3')"),
    "stats not an object": (lambda o: o[1].update(stats=[1]), 2, "stats: must be a mapping (got list [1])"),
    "stats field missing": (lambda o: o[1]["stats"].pop("queued_ts"), 2, "stats: missing field 'queued_ts'"),
    "stats negative": (lambda o: o[1]["stats"].update(arrival_time=-0.001), 2, "stats.arrival_time: must be >= 0 (got -0.001)"),
    "stats out of order": (lambda o: o[1]["stats"].update(first_token_ts=0.0009), 2,
                           "stats.first_token_ts: before stats.scheduled_ts 0.001 (got 0.0009)"),
    "request list ill-typed": (lambda o: o[3].update(new_reqs=["r0"]), 4, "new_reqs[0]: must be an integer (got 'r0')"),
    "request list no such request": (lambda o: o[4].update(finished_reqs=[2]), 5,
                                     "finished_reqs: no such request: the file has 2 (got 2)"),
    "request listed twice": (lambda o: o[4].update(new_reqs=[0]), 5,
                             "new_reqs: request already listed by an earlier step (got 0)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recordings_fail_with_one_line(tmp_path, case):
    mutate, line, message = BAD[case]
    path = _write_raw(tmp_path, _mutate(mutate))
    with pytest.raises(R.RecordingError) as exc:
        R.read(path)
    assert str(exc.value) == f"{path}:{line}: {message}"
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("case", ["wrong format", "finish before first token", "step shape disagrees", "n mismatch"])
def test_writer_refuses_what_the_reader_refuses(tmp_path, case):
    mutate, line, message = BAD[case]
    objs = _mutate(mutate)
    rec = R.Recording(header=objs[0], requests=[o for o in objs if o["kind"] == "request"],
                      steps=[o for o in objs if o["kind"] == "step"])
    out = tmp_path / "w.jsonl.gz"
    with pytest.raises(R.RecordingError, match=rf"^{re.escape(str(out))}:{line}: {re.escape(message)}$"):
        R.write(out, rec)
    assert not out.exists()
    with pytest.raises(R.RecordingError, match=rf"^mem:{line}: {re.escape(message)}$"):
        R.validate(rec, name="mem")


def test_not_json_empty_and_truncated(tmp_path):
    p = _write_raw(tmp_path, None, text_override=json.dumps(_lines(good())[0]) + "\n{not json\n")
    with pytest.raises(R.RecordingError, match=r":2: <json>: not JSON"):
        R.read(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(R.RecordingError, match=r"empty.jsonl:1: kind: no header \(empty recording\)"):
        R.read(empty)
    gz = R.write(tmp_path / "t.jsonl.gz", good())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(R.RecordingError, match=r"cut.jsonl.gz:\d+: <file>: unreadable"):
        R.read(cut)
    with pytest.raises(R.RecordingError, match=r"missing.jsonl:0: <file>: cannot be read \(got 'No such file or directory'\)"):
        R.read(tmp_path / "missing.jsonl")


def test_optional_fields_absent_still_valid(tmp_path):
    # recordings made before the request stats and step request lists existed stay valid
    rec = good()
    del rec.requests[0]["stats"]
    for s in rec.steps:
        for k in R.REQ_LISTS:
            del s[k]
    assert R.summary(R.read(R.write(tmp_path / "old.jsonl", rec)))["n"] == 2


def test_stats_times_rounded(tmp_path):
    rec = good()
    rec.requests[0]["stats"]["last_token_ts"] = 0.0490000004
    assert R.read(R.write(tmp_path / "s.jsonl", rec)).requests[0]["stats"]["last_token_ts"] == 0.049


def test_good_mutation_baseline_is_valid(tmp_path):
    # the bad cases differ from a recording the reader accepts only by their mutation
    path = _write_raw(tmp_path, _mutate(lambda o: None))
    assert R.summary(R.read(path))["n"] == 2
    rec = copy.deepcopy(good())
    R.validate(rec)
