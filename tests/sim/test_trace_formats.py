"""Real trace formats (issue 14 item 4): Azure, Mooncake, BurstGPT and ShareGPT samples written
here (nothing downloaded), read into workloads: lengths and times, scaling and windows, shared
prompt tokens from shared Mooncake hash ids (a prefix-cache hit in a simulated run), streaming, and
every bad input one line + exit 2 through the CLI."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest
import yaml

from vllm_faultsim.harness import trace_formats as tf
from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.runs.simulate import build_workload, config_from_dict, simulate
from vllm_faultsim.harness.workload import WorkloadError, spec_from_dict, spec_to_dict
from vllm_faultsim.models.request import prompt_token_ids

pytestmark = pytest.mark.sim

AZURE_2023 = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
"""
AZURE_2024 = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.009930+00:00,2048,28
2024-05-10 00:00:01.509930+00:00,120,0
2024-05-10 00:00:02.009930+00:00,4000,100
"""
# Mooncake: timestamp in ms, one hash id per 512-token block (r0/r3 alike, r1/r2 share block 0 only)
MOONCAKE = [{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
            {"timestamp": 0, "input_length": 1000, "output_length": 4, "hash_ids": [0, 3]},
            {"timestamp": 3052, "input_length": 600, "output_length": 6, "hash_ids": [0, 4]},
            {"timestamp": 9000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]}]
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,230,1317,Conversation log
118,GPT-4,417,276,693,Conversation log
120,GPT-4,300,0,300,API log
130,ChatGPT,90,10,100,API log
"""
SHAREGPT = [{"id": "a", "conversations": [{"from": "human", "value": "x" * 40}, {"from": "gpt", "value": "y" * 13}]},
            {"id": "b", "conversations": [{"from": "human", "value": "only one turn"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "z" * 8}, {"from": "gpt", "value": "w" * 400},
                                          {"from": "human", "value": "a third turn is not read"}]}]


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return str(p)


def _read(kind, path, max_model_len=8192, seed=0, **opts):
    return tuple(tf.read(tf.WORKLOADS[kind](kind=kind, path=path, **opts), seed=seed, max_model_len=max_model_len))


def _shape(specs):
    return [(s.arrival, s.prompt_len, s.output_len) for s in specs]


# ---- each format: lengths and times ----------------------------------------------------------

def test_azure_2023_and_2024_timestamps(tmp_path):
    assert _shape(_read("azure", _write(tmp_path, "conv.csv", AZURE_2023))) == [
        (0.0, 374, 44), (4.314579, 396, 109), (4.541877, 879, 55)]  # 7-digit fractions: microseconds kept
    # tz-aware 2024 form; a row with 0 generated tokens is skipped
    assert _shape(_read("azure", _write(tmp_path, "code.csv", AZURE_2024))) == [(0.0, 2048, 28), (2.0, 4000, 100)]


def test_mooncake_times_in_ms_and_hash_ids(tmp_path):
    specs = _read("mooncake", _write(tmp_path, "mc.jsonl", _jsonl(MOONCAKE)))
    assert _shape(specs) == [(0.0, 1100, 5), (0.0, 1000, 4), (3.052, 600, 6), (9.0, 1100, 5)]
    assert [s.hash_ids for s in specs] == [(0, 1, 2), (0, 3), (0, 4), (0, 1, 2)]
    assert {s.chunk_hash_size for s in specs} == {512}


def test_burstgpt_skips_failed_requests_and_filters_a_model(tmp_path):
    path = _write(tmp_path, "BurstGPT_1.csv", BURSTGPT)
    # trace time from the first row (5 s); the failed GPT-4 row (0 response tokens) is skipped
    assert _shape(_read("burstgpt", path)) == [(0.0, 472, 18), (40.0, 1087, 230), (113.0, 417, 276), (125.0, 90, 10)]
    assert _shape(_read("burstgpt", path, model="GPT-4")) == [(113.0, 417, 276)]  # vLLM's benchmark keeps GPT-4
    # BurstGPT_3's extra columns (Session ID, Elapsed time) are not needed
    v3 = "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n" \
         "7,4f1c,1.5,GPT-4,100,20,120,Conversation log\n8,4f1c,2.0,GPT-4,130,25,155,Conversation log\n"
    assert _shape(_read("burstgpt", _write(tmp_path, "BurstGPT_3.csv", v3))) == [(0.0, 100, 20), (1.0, 130, 25)]


def test_sharegpt_lengths_chars_over_4_and_poisson_arrivals(tmp_path):
    path = _write(tmp_path, "sg.json", json.dumps(SHAREGPT, indent=1))
    specs = _read("sharegpt", path, rate=2.0)
    # the first two turns; ceil(chars / 4); an entry with one turn is skipped (as vLLM's ShareGPTDataset)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(10, 4), (2, 100)]
    assert [(s.prompt_len, s.output_len) for s in _read("sharegpt", path, rate=2.0, chars_per_token=2)] == [
        (20, 7), (4, 200)]
    assert 0 < specs[0].arrival < specs[1].arrival
    assert _read("sharegpt", path, rate=2.0) == specs  # same seed, same arrivals
    assert _shape(_read("sharegpt", path, rate=2.0, seed=1)) != _shape(specs)
    assert len(_read("sharegpt", path, rate=2.0, max_requests=1)) == 1


def test_sharegpt_streamed_in_small_chunks_reads_the_same(tmp_path, monkeypatch):
    entries = [{"id": str(i), "conversations": [{"from": "human", "value": "p\n" * (i + 1)},
                                                {"from": "gpt", "value": "q" * (3 * i + 1)}]} for i in range(50)]
    path = _write(tmp_path, "sg.json", json.dumps(entries, indent=2))
    whole = _read("sharegpt", path, rate=5.0)
    monkeypatch.setattr(tf, "CHUNK_CHARS", 7)  # every item crosses chunk boundaries
    assert _read("sharegpt", path, rate=5.0) == whole and len(whole) == 50
    bad = json.dumps(entries[:3], indent=2).replace('"q"', '"q" oops', 1)
    with pytest.raises(WorkloadError, match=r"sg2.json:(\d+): not valid JSON") as exc:
        _read("sharegpt", _write(tmp_path, "sg2.json", bad), rate=5.0)
    line = int(str(exc.value).split(":")[1])
    assert "oops" in bad.splitlines()[line - 1]  # the line named is the bad one, across chunks


def test_gzip_trace(tmp_path):
    p = tmp_path / "mc.jsonl.gz"
    p.write_bytes(gzip.compress(_jsonl(MOONCAKE).encode()))
    assert _read("mooncake", str(p)) == _read("mooncake", _write(tmp_path, "mc.jsonl", _jsonl(MOONCAKE)))


# ---- scaling, windows, limits, lengths -------------------------------------------------------

def test_time_scale_rate_window_and_max_requests(tmp_path):
    path = _write(tmp_path, "BurstGPT_1.csv", BURSTGPT)
    assert [s.arrival for s in _read("burstgpt", path, time_scale=0.5)] == [0.0, 20.0, 56.5, 62.5]
    # rate: the selection's mean rate ((n - 1) / span) becomes 3 req/s
    specs = _read("burstgpt", path, rate=3.0)
    assert (len(specs) - 1) / (specs[-1].arrival - specs[0].arrival) == pytest.approx(3.0)
    # window [40, 120) of trace time, re-based to its start; then the first max_requests
    assert _shape(_read("burstgpt", path, start=40, duration=80)) == [(0.0, 1087, 230), (73.0, 417, 276)]
    assert _shape(_read("burstgpt", path, start=40, max_requests=1)) == [(0.0, 1087, 230)]
    assert _shape(_read("burstgpt", path, start=40, duration=80, time_scale=2)) == [(0.0, 1087, 230),
                                                                                   (146.0, 417, 276)]


def test_a_window_stops_reading_at_its_end(tmp_path):
    """Timestamps are sorted (required), so rows after the window are never read: a bad row there
    does not matter, and a large file's head is read alone."""
    text = BURSTGPT + "190,ChatGPT,5,5,10,API log\n200,ChatGPT,not-a-number,1,1,API log\n"
    path = _write(tmp_path, "b.csv", text)
    assert len(_read("burstgpt", path, duration=150)) == 4  # the row at 190 s ends the window
    assert len(_read("burstgpt", path, max_requests=2)) == 2
    with pytest.raises(WorkloadError, match=r"b.csv:8: Request tokens: must be an integer \(got 'not-a-number'\)"):
        _read("burstgpt", path)


def test_over_length_refuse_clip_skip(tmp_path):
    path = _write(tmp_path, "code.csv", AZURE_2024)
    with pytest.raises(WorkloadError, match=r"code.csv:2: the prompt \(2048 tokens\) is not shorter than "
                                            r"max_model_len 2048"):
        _read("azure", path, max_model_len=2048)
    assert _shape(_read("azure", path, max_model_len=2048, over_length="clip")) == [(0.0, 2047, 28),
                                                                                    (2.0, 2047, 100)]
    with pytest.raises(WorkloadError, match="no requests selected"):  # both prompts skipped: none left
        _read("azure", path, max_model_len=2048, over_length="skip")
    assert _shape(_read("azure", path, max_model_len=3000, over_length="skip")) == [(0.0, 2048, 28)]
    # a clipped Mooncake prompt keeps the hash ids of the blocks it still has
    specs = _read("mooncake", _write(tmp_path, "mc.jsonl", _jsonl(MOONCAKE)), max_model_len=513, over_length="clip")
    assert [(s.prompt_len, s.hash_ids) for s in specs] == [(512, (0,)), (512, (0,)), (512, (0,)), (512, (0,))]


# ---- shared prefixes from hash ids -----------------------------------------------------------

def test_shared_hash_ids_share_prompt_tokens_and_others_do_not(tmp_path):
    r0, r1, r2, r3 = (prompt_token_ids(s) for s in _read("mooncake", _write(tmp_path, "mc.jsonl", _jsonl(MOONCAKE))))
    assert r0 == r3  # the same hash ids, the same prompt (ids differ: r0, r3)
    assert r0[:512] == r1[:512] == r2[:512]  # hash id 0
    assert r0[512:1000] != r1[512:1000] and r1[512:600] != r2[512:600]  # hash ids 1, 3, 4
    # a different request id does not change tokens the hash ids cover; past them they are the request's own
    short = spec_from_dict({"id": "x", "arrival": 0, "prompt_tokens": 700, "output_tokens": 1, "hash_ids": [0]}, "x")
    other = spec_from_dict({"id": "y", "arrival": 0, "prompt_tokens": 700, "output_tokens": 1, "hash_ids": [0]}, "y")
    assert prompt_token_ids(short)[:512] == r0[:512] and prompt_token_ids(short)[512:] != prompt_token_ids(other)[512:]
    assert spec_from_dict(spec_to_dict(short), "z") == short  # the JSONL replay form keeps the hash ids


def _mooncake_run(tmp_path, rows, name):
    cfg = config_from_dict({"scheduler": {"enable_prefix_caching": True, "async_scheduling": False},
                            "workload": {"kind": "mooncake", "path": _write(tmp_path, name, _jsonl(rows))}})
    res = simulate(cfg, trace_path=tmp_path / f"{name}.trace.jsonl")
    first = {}
    for e in res.events:
        if e["kind"] == "step":
            for rid, n in e["sched"].items():
                first.setdefault(rid, n)
    return res, first


def test_prefix_cache_hit_in_a_simulated_mooncake_run(tmp_path):
    """r3 (9 s, after r0 finished) repeats r0's hash ids: it computes only what is past the hit
    (68 full 16-token blocks of its 1100 tokens, the last token always computed); with its own
    hash ids it computes its whole prompt."""
    res, first = _mooncake_run(tmp_path, MOONCAKE, "hit.jsonl")
    assert res.summary["finished"] == 4
    assert first["r3"] == 1100 - 68 * 16
    assert first["r2"] == 600 - 512  # hash id 0 only
    fresh = [*MOONCAKE[:3], {**MOONCAKE[3], "hash_ids": [7, 8, 9]}]
    _, first = _mooncake_run(tmp_path, fresh, "miss.jsonl")
    assert first["r3"] == 1100


def test_same_seed_same_trace_bytes(tmp_path):
    path = _write(tmp_path, "sg.json", json.dumps(SHAREGPT))
    cfg = {"workload": {"kind": "sharegpt", "path": path, "rate": 3}, "seed": 4}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    for t in ("a.jsonl", "b.jsonl"):
        assert main(["run", "--config", str(tmp_path / "run.yaml"), "--trace", str(tmp_path / t), "--no-progress"]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


# ---- memory: the file is streamed ------------------------------------------------------------

def test_reading_does_not_hold_the_file(tmp_path, monkeypatch):
    entries = [{"id": str(i), "conversations": [{"from": "human", "value": "p" * 4000},
                                                {"from": "gpt", "value": "q" * 4000}]} for i in range(1500)]
    path = _write(tmp_path, "big.json", json.dumps(entries))
    size = Path(path).stat().st_size
    del entries
    monkeypatch.setattr(tf, "CHUNK_CHARS", 1 << 16)
    tracemalloc.start()
    try:
        specs = _read("sharegpt", path, rate=10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(specs) == 1500 and size > 10_000_000
    assert peak < size / 8, (peak, size)  # a few chunks and the specs, not the file


# ---- bad input: one line naming file:line and the value, exit 2, nothing written ---------------

BAD = [  # (kind, file name, file text or None: no file, extra workload fields, expected text in the error)
    ("azure", "trace.csv", AZURE_2023.replace("879", "abc"), {}, "trace.csv:4: ContextTokens: must be an integer (got 'abc')"),
    ("azure", "trace.csv", AZURE_2023.replace("109", "-5"), {}, "trace.csv:3: GeneratedTokens: must be >= 0 (got '-5')"),
    ("azure", "trace.csv", AZURE_2023.replace("2023-11-16 18:15:50.9951690", "yesterday"), {},
     "trace.csv:3: TIMESTAMP: must be a date and time, e.g. 2023-11-16 18:15:46.6805900 (got 'yesterday')"),
    ("azure", "trace.csv", AZURE_2023.replace("18:15:51", "18:15:40"), {},
     "trace.csv:4: timestamp '2023-11-16 18:15:40.2224670' is earlier than line 3's"),
    ("azure", "trace.csv", "Time,Context,Generated\n1,2,3\n", {}, "trace.csv:1: no column 'TIMESTAMP'"),
    ("azure", "trace.csv", "", {}, "trace.csv: empty file"),
    ("azure", "trace.csv", AZURE_2023.splitlines()[0] + "\n", {}, "trace.csv: no requests selected (0 rows read"),
    ("azure", "trace.csv", AZURE_2023 + "2023-11-16 18:15:52.0,12\n", {}, "trace.csv:5: 2 fields, the header has 3"),
    ("azure", "missing.csv", None, {}, "missing.csv: cannot read workload (No such file or directory)"),
    ("azure", "trace.csv", b"\xff\xfe\x00T\x00I", {}, "trace.csv: not UTF-8 text (byte 0xff)"),
    ("azure", "trace.csv", AZURE_2023, {"max_requests": 0}, "workload (azure): max_requests: must be >= 1 (got 0)"),
    ("azure", "trace.csv", AZURE_2023, {"time_scale": 0}, "workload (azure): time_scale: must be > 0 (got 0)"),
    ("azure", "trace.csv", AZURE_2023, {"time_scale": 2, "rate": 3}, "give at most one of time_scale and rate"),
    ("azure", "trace.csv", AZURE_2023, {"rate": ".nan"}, "workload (azure): rate: must be finite (got nan)"),
    ("azure", "trace.csv", AZURE_2023, {"start": -1}, "workload (azure): start: must be >= 0 (got -1)"),
    ("azure", "trace.csv", AZURE_2023, {"over_length": "truncate"}, "over_length: must be one of refuse, clip, skip (got 'truncate')"),
    ("azure", "trace.csv", AZURE_2023, {"chunk_hash_size": 16}, "workload (azure): unknown field 'chunk_hash_size'"),
    ("azure", "trace.csv", AZURE_2023, {"start": 100}, "trace.csv: no requests selected (3 rows read"),
    ("azure", "trace.csv", AZURE_2023, {"max_model_len": 512}, "trace.csv:4: the prompt (879 tokens) is not shorter "
                                                                "than max_model_len 512"),
    ("burstgpt", "b.csv", BURSTGPT.replace("45,", "nan,"), {},
     "b.csv:3: Timestamp: must be finite (got 'nan')"),
    ("burstgpt", "b.csv", BURSTGPT.replace("45,", "inf,"), {},
     "b.csv:3: Timestamp: must be finite (got 'inf')"),
    ("burstgpt", "b.csv", BURSTGPT.replace("118,", "30,"), {}, "b.csv:4: timestamp '30' is earlier than line 3's '45'"),
    ("burstgpt", "b.csv", BURSTGPT.replace("1087", "-1087"), {}, "b.csv:3: Request tokens: must be >= 0 (got '-1087')"),
    ("burstgpt", "b.csv", BURSTGPT, {"model": "GPT-5"}, "b.csv: no requests selected (0 rows read"),
    ("burstgpt", "b.csv", BURSTGPT, {"model": 4}, "workload (burstgpt): model: must be a string (got 4)"),
    ("burstgpt", "b.csv", BURSTGPT.replace("5,ChatGPT", "5\x00,ChatGPT", 1), {},
     r"b.csv:2: Timestamp: must be a number (got '5\x00')"),
    ("mooncake", "mc.jsonl", _jsonl(MOONCAKE[:2] + ['{"timestamp": 1, "input_length": 5'] + MOONCAKE[2:]), {},
     "mc.jsonl:3: not valid JSON"),
    ("mooncake", "mc.jsonl", _jsonl([*MOONCAKE[:1], {"timestamp": 5, "input_length": 3}]), {},
     "mc.jsonl:2: missing field 'output_length'"),
    ("mooncake", "mc.jsonl", _jsonl([*MOONCAKE[:1], '{"timestamp": NaN, "input_length": 3, "output_length": 1}']), {},
     "mc.jsonl:2: timestamp: must be finite (got nan)"),
    ("mooncake", "mc.jsonl", _jsonl([*MOONCAKE[:1], '{"timestamp": Infinity, "input_length": 3, "output_length": 1}']),
     {}, "mc.jsonl:2: timestamp: must be finite (got inf)"),
    ("mooncake", "mc.jsonl", _jsonl([*MOONCAKE[:1], {"timestamp": 5, "input_length": -3, "output_length": 1}]), {},
     "mc.jsonl:2: input_length: must be >= 0 (got -3)"),
    ("mooncake", "mc.jsonl", _jsonl([*MOONCAKE[:1], {"timestamp": 5, "input_length": 3.5, "output_length": 1}]), {},
     "mc.jsonl:2: input_length: must be an integer (got 3.5)"),
    ("mooncake", "mc.jsonl", _jsonl([{**MOONCAKE[0], "hash_ids": [0, "a"]}]), {},
     "mc.jsonl:1: hash_ids[1]: must be an integer (got 'a')"),
    ("mooncake", "mc.jsonl", _jsonl([*MOONCAKE[:1], {**MOONCAKE[1], "timestamp": -4}]), {},
     "mc.jsonl:2: timestamp: must be >= 0 (got -4)"),
    ("mooncake", "mc.jsonl", _jsonl([{"timestamp": 0, "input_length": 100, "output_length": 2, "hash_ids": list(range(7))}]),
     {}, "mc.jsonl:1: 7 hash_ids for input_length 100, more than ceil(input_length / chunk_hash_size) = 1"),
    ("mooncake", "mc.jsonl", _jsonl(MOONCAKE), {"chunk_hash_size": 0}, "workload (mooncake): chunk_hash_size: must be >= 1 (got 0)"),
    ("mooncake", "mc.jsonl", _jsonl(MOONCAKE[2:] + MOONCAKE[:1]), {},
     "mc.jsonl:3: timestamp 0 is earlier than line 2's 9000"),
    ("mooncake", "mc.jsonl", "\n\n", {}, "mc.jsonl: empty file (expected one JSON request per line)"),
    ("mooncake", "mc.jsonl", "", {}, "mc.jsonl: empty file"),
    ("mooncake", "mc.jsonl", _jsonl(["[1, 2]"]), {}, "mc.jsonl:1: must be a mapping (got list [1, 2])"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT), {"rate": 0}, "workload (sharegpt): rate: must be > 0 (got 0)"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT), {"rate": 1, "chars_per_token": -1}, "workload (sharegpt): chars_per_token: must be > 0 (got -1)"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT), {}, "workload (sharegpt): missing field 'rate'"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT), {"rate": 1, "start": 3},
     "workload (sharegpt): unknown field 'start'"),
    ("sharegpt", "sg.json", "", {"rate": 1}, "sg.json: empty file"),
    ("sharegpt", "sg.json", "\n" + json.dumps(SHAREGPT[0]), {"rate": 1},
     "sg.json:2: expected a JSON array of conversations"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT, indent=1)[:-2], {"rate": 1}, "the JSON array is not closed"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT, indent=1) + "\n[]", {"rate": 1}, "text after the JSON array"),
    ("sharegpt", "sg.json", json.dumps([SHAREGPT[0], 5]), {"rate": 1},
     "sg.json:1: a conversation must be a JSON object"),
    ("sharegpt", "sg.json", json.dumps([{"conversations": [{"from": "human"}, {"value": "x"}]}], indent=1), {"rate": 1},
     "sg.json:2: conversations[0] has no string 'value'"),
    ("sharegpt", "sg.json", json.dumps([SHAREGPT[1]]), {"rate": 1}, "sg.json: no requests selected (1 entries read"),
    ("sharegpt", "sg.json", json.dumps(SHAREGPT, indent=1), {"rate": 1, "max_model_len": 10},
     "sg.json:2: the prompt (10 tokens) is not shorter than max_model_len 10"),
]


@pytest.mark.parametrize("kind,name,text,extra,expected", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_trace_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, kind, name, text, extra, expected):
    extra = dict(extra)
    sched = {"max_model_len": extra.pop("max_model_len")} if "max_model_len" in extra else {}
    data = tmp_path / "data"
    data.mkdir()
    if text is not None:
        _write(data, name, text)
    wl = {"kind": kind, "path": str(data / name), **{k: (float("nan") if v == ".nan" else v) for k, v in extra.items()}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"workload": wl, "scheduler": sched}))
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code = main(["run", "--config", "run.yaml", "--trace", str(tmp_path / "t.jsonl"), "--no-progress"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vllm-faultsim: error: "), (code, err)
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err and sorted(tmp_path.rglob("*")) == before


def test_workload_kinds_listed_in_the_error(tmp_path):
    cfg = config_from_dict({"workload": {"kind": "azure", "path": _write(tmp_path, "a.csv", AZURE_2023)}})
    assert len(build_workload(cfg)) == 3
    with pytest.raises(Exception, match="azure, mooncake, burstgpt, sharegpt"):
        config_from_dict({"workload": {"kind": "alibaba"}})


def test_readme_trace_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "Real trace formats" config, as written there, on a Mooncake-like sample."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Real trace formats", 1)[1].split("\n### ", 1)[0]
    cfg = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    rows, next_id = [], 100
    for i in range(200):  # one request every 5 s; 4 system prompts (hash ids 0-3) shared, the rest fresh
        n = 40_000 if i == 150 else 1500 + 37 * (i % 20)  # one prompt over max_model_len (skipped)
        blocks = -(-n // 512)
        rows.append({"timestamp": 5000 * i, "input_length": n, "output_length": 8 + i % 5,
                     "hash_ids": [i % 4] + list(range(next_id, next_id + blocks - 1))})
        next_id += blocks - 1
    monkeypatch.chdir(tmp_path)
    Path(cfg["workload"]["path"]).write_text(_jsonl(rows))
    Path("run.yaml").write_text(yaml.safe_dump(cfg))
    specs = build_workload(config_from_dict(cfg))
    assert len(specs) == 59  # rows at 600..895 s, less the one over max_model_len
    assert (len(specs) - 1) / (specs[-1].arrival - specs[0].arrival) == pytest.approx(8.0)
    assert main(["run", "--config", "run.yaml", "--trace", "mooncake-trace.jsonl", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"] == 59
