"""benchmarks/step_profile.py reads vLLM's worker-profiler trace as kineto writes it: a step is an
``execute_model`` annotation, its GPU work the kernels whose launching CPU call falls in it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("step_profile", ROOT / "benchmarks" / "step_profile.py")
step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_profile)


def _x(cat, name, ts, dur, corr=None):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
            "args": {} if corr is None else {"correlation": corr}}


def test_a_step_is_its_annotation_and_the_kernels_it_launched():
    events = [
        # step 0: a mixed batch launched kernel by kernel (2 kernels, overlapping on two streams)
        _x("user_annotation", "execute_300_context_1(sq200sk250sqsq1sqsk1)_generation_100(sq100sk5100sqsq1sqsk1)",
           1000.0, 50.0),
        _x("cuda_runtime", "cudaLaunchKernel", 1010.0, 2.0, corr=1),
        _x("cuda_driver", "cuLaunchKernelEx", 1020.0, 2.0, corr=2),
        _x("kernel", "gemm", 1015.0, 30.0, corr=1),
        _x("kernel", "attn", 1040.0, 20.0, corr=2),   # overlaps gemm by 5 us: busy 45, not 50
        _x("cuda_runtime", "cudaLaunchKernel", 1060.0, 1.0, corr=3),  # after the annotation: sampling
        _x("kernel", "sample", 1065.0, 4.0, corr=3),
        # step 1: a decode batch replaying one CUDA graph of two kernels
        _x("user_annotation", "execute_8_context_0(sq0sk0sqsq0sqsk0)_generation_8(sq8sk808sqsq8sqsk808)",
           1100.0, 10.0),
        _x("cuda_runtime", "cudaGraphLaunch", 1105.0, 3.0, corr=4),
        _x("kernel", "g1", 1108.0, 6.0, corr=4),
        _x("kernel", "g2", 1114.0, 6.0, corr=4),
        _x("cpu_op", "aten::mm", 1101.0, 1.0),
        {"ph": "s", "cat": "ac2g", "id": 4, "ts": 1105.0},  # flow events are not X events
    ]
    rows = step_profile.parse(events)
    assert len(rows) == 2
    a, b = rows
    assert (a["num_prefill_requests"], a["sum_prefill_tokens"], a["sum_prefill_kv_tokens"]) == (1, 200, 50)
    assert (a["num_decode_requests"], a["sum_decode_kv_tokens"], a["total_tokens"]) == (100, 5000, 300)
    assert a["fwd_kernels"] == 2 and a["fwd_busy_us"] == 45.0 and a["seg_busy_us"] == 49.0
    assert (a["fwd_gpu_start_us"], a["fwd_gpu_end_us"], a["cpu_end_us"]) == (15.0, 60.0, 50.0)
    assert b["graph_launches"] == 1 and b["fwd_kernels"] == 2 and b["fwd_busy_us"] == 12.0
    assert (b["num_decode_requests"], b["sum_decode_kv_tokens"], b["cpu_start_us"]) == (8, 800, 100.0)


def test_compare_sorts_steps_by_runtime_mode():
    class Flat:  # a stand-in estimator: 10 us a token
        def batch_seconds(self, shape):
            return 1e-5 * (shape[1] + shape[3])

    row = {"fwd_kernels": 1, "fwd_gpu_end_us": 60.0, "cpu_end_us": 50.0, "sum_prefill_kv_tokens": 0, "seg_busy_us": 800.0,
           "sum_decode_kv_tokens": 0}
    rows = [{**row, "num_prefill_requests": 0, "sum_prefill_tokens": 0, "num_decode_requests": 8,
             "total_tokens": 8, "fwd_busy_us": 160.0},
            {**row, "num_prefill_requests": 1, "sum_prefill_tokens": 600, "num_decode_requests": 100,
             "total_tokens": 700, "fwd_busy_us": 7000.0}]
    table = step_profile.compare(rows, Flat(), max_num_seqs=1024, capture=512)
    assert [(t["mode"], t["requests"], t["ratio"]) for t in table] == [("FULL", "0-63", 2.0), ("NONE", "64-127", 1.0)]
    assert table[0]["gpu_after_launch_ms"] == 0.01
