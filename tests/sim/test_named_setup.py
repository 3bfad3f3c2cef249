"""The named real setup behind `vllm-faultsim run`'s defaults and the default study: its numbers
against their sources, how a config is laid over it, and the placeholder profile labelled as one."""

import gzip
import json
import random
from pathlib import Path

import pytest

from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.named_setup import DEFAULT_SETUP, apply_setup, available_setups, load_setup
from vllm_faultsim.harness.runs.simulate import ConfigError, RunConfig, config_from_dict
from vllm_faultsim.harness.runs.study import load_study, setup_line
from vllm_faultsim.models.request import RequestSpec, prompt_token_ids

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "benchmarks" / "results" / "recordings" / "llama-3.1-8b-near.jsonl.gz"
WORKLOAD = {"kind": "poisson", "rate": 5, "duration": 2, "prompt": 64, "output": 8}


def header_of(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def test_the_default_setup_is_vllms_defaults_on_the_measured_h200():
    setup = load_setup(DEFAULT_SETUP)
    assert DEFAULT_SETUP in available_setups()
    sched = setup["run"]["scheduler"]
    # EngineArgs.get_batch_defaults, OPENAI_API_SERVER on a GPU of >= 70 GiB; max_position_embeddings
    assert (sched["max_num_seqs"], sched["max_num_batched_tokens"], sched["max_model_len"]) == (1024, 8192, 131072)
    with gzip.open(RECORDING, "rt") as fh:
        head = json.loads(fh.readline())
    engine = head["engine"]
    assert head["gpu"] == setup["gpu"] and head["vllm"] == setup["vllm"]
    # the KV cache vLLM measured on that H200 at gpu_memory_utilization 0.92 (CacheConfig's default)
    assert engine["gpu_memory_utilization"] == 0.92 and sched["num_gpu_blocks"] == engine["num_gpu_blocks"]
    for key in ("block_size", "enable_prefix_caching", "async_scheduling", "enable_chunked_prefill"):
        assert sched[key] == engine[key], key
    # 919,824 tokens in 2 MiB blocks of 16 tokens (32 layers x 8 KV heads x 128 x K,V x bf16)
    hf = head["hf_config"]
    block_bytes = 16 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * 128 * 2 * 2
    assert block_bytes == 2 << 20 and sched["num_gpu_blocks"] * 16 == 919_824
    assert sched["max_model_len"] == hf["max_position_embeddings"]
    assert setup["run"]["step_time"]["backend"] == "aic" and setup["run"]["serving"]


def test_run_without_config_uses_the_setup(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert main(["run", "--duration", "2", "--rate", "5", "--trace", str(trace), "--no-progress"]) == 0
    out = capsys.readouterr().out
    head = header_of(trace)
    cfg = head["config"]
    assert cfg["setup"] == DEFAULT_SETUP and cfg["scheduler"]["max_num_seqs"] == 1024
    assert cfg["step_time"]["backend"] == "aic" and cfg["serving"]["schedule_base_s"] > 0
    # aiconfigurator-core is a dependency (CPython >= 3.11); without it the clock names the fallback
    assert head["clock"].startswith("aic: ") or "PLACEHOLDER" in head["clock"]
    assert f"setup {DEFAULT_SETUP}; step time " in out


def test_the_placeholder_profile_is_labelled_wherever_it_is_shown(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert main(["run", "--duration", "2", "--rate", "5", "--profile", "default", "--trace", str(trace),
                 "--no-progress"]) == 0
    assert "PLACEHOLDER" in header_of(trace)["clock"] and "step_time" not in header_of(trace)["config"]
    assert "PLACEHOLDER" in capsys.readouterr().out
    cfg = tmp_path / "run.yaml"  # a config file without a setup: RunConfig's defaults, the placeholder
    cfg.write_text("workload: {kind: poisson, rate: 5, duration: 2, prompt: 64, output: 8}\n")
    assert main(["run", "--config", str(cfg), "--trace", str(trace), "--no-progress"]) == 0
    assert "setup" not in header_of(trace)["config"] and "PLACEHOLDER" in header_of(trace)["clock"]
    spec = tmp_path / "study.yaml"
    spec.write_text("base: {workload: {kind: poisson, duration: 2, prompt: 64, output: 8}}\n"
                    "grid: {workload.rate: [5.0]}\n")
    assert "PLACEHOLDER" in setup_line(load_study(str(spec)))


def test_cli_help_names_the_setup_and_the_placeholder(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert DEFAULT_SETUP in text and "PLACEHOLDER" in text


def test_the_default_study_runs_on_the_setup():
    spec = load_study(None)
    assert spec["base"]["setup"] == DEFAULT_SETUP
    line = setup_line(spec)
    assert line.startswith(f"setup {DEFAULT_SETUP}; step time ") and " | " not in line


def test_a_config_is_merged_over_its_setup():
    base = config_from_dict({"setup": DEFAULT_SETUP, "workload": WORKLOAD})
    small = config_from_dict({"setup": DEFAULT_SETUP, "workload": WORKLOAD, "scheduler": {"max_num_seqs": 64}})
    assert small.scheduler.max_num_seqs == 64 and small.scheduler.num_gpu_blocks == base.scheduler.num_gpu_blocks
    assert small.step_time == base.step_time and small.serving == base.serving
    linear = config_from_dict({"setup": DEFAULT_SETUP, "workload": WORKLOAD, "profile": "default"})
    assert linear.step_time is None and linear.scheduler == base.scheduler
    sync = config_from_dict({"setup": DEFAULT_SETUP, "workload": WORKLOAD, "scheduler": {"async_scheduling": False}})
    assert sync.serving is None  # measured under async scheduling: not laid over a sync engine
    assert apply_setup({"workload": WORKLOAD}) == {"workload": WORKLOAD}  # no setup: unchanged
    assert RunConfig().setup is None and "setup" not in RunConfig().to_dict()
    # what a trace header or replay file holds reads back to the same config
    for cfg in (base, small, linear, sync):
        assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("setup, expected", [("nope", "unknown setup 'nope'"), (3, "setup must be a setup name")])
def test_a_bad_setup_is_one_line(tmp_path, capsys, setup, expected):
    with pytest.raises(ConfigError, match=expected):
        config_from_dict({"setup": setup, "workload": WORKLOAD})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"setup": setup, "workload": WORKLOAD}))
    assert main(["run", "--config", str(cfg), "--trace", str(tmp_path / "t.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and not (tmp_path / "t.jsonl").exists()


def test_prompts_of_long_request_ids_are_their_own():
    """With prefix caching on (vLLM's default), prompts that collide become cache hits: ids of five
    or more bytes once drew the prompt of their first four (r1000..r1009 that of r100)."""
    firsts = {tuple(prompt_token_ids(RequestSpec(f"r{i}", 0.0, 16, 1))) for i in range(2000)}
    assert len(firsts) == 2000
    for rid in ("r0", "r7", "r1000", "r12345"):  # drawn as randrange draws them
        rng = random.Random(int.from_bytes(rid.encode(), "little"))
        assert prompt_token_ids(RequestSpec(rid, 0.0, 700, 1)) == [3 + rng.randrange(1000) for _ in range(700)]
