"""Step-time calibration of the tiny model and its fidelity on a held-out Poisson trace.

``vllm-faultsim calibrate`` (harness/runs/calibrate.py, run here as ``python -m`` in its own process)
measures the real engine's step wall time over a grid of batch shapes, fits the simulator's
linear step-time model and writes a profile; then a Poisson trace that played no part in the fit
is served in real time and simulated with the new profile. The project's target is <= 5% error
on TTFT, TPOT and end-to-end latency; the figures go to ``fidelity_tiny-llama.json`` and are
reported against that target.

Tolerances asserted here guard against a broken calibration rather than restate the target:
the fit must be unbiased on its own steps (total within 2%; R^2 is not asserted: the tiny model's
step time is nearly flat in the batch shape, so the +-20% step-to-step jitter of eager mode
dominates its variance), and the simulated mean TTFT, TPOT and E2E must be within 35% of the
real ones. 35% is the real engine's own run-to-run spread measured on the H100 lent here: the
same held-out trace, same engine settings, two runs on two lent machines gave a real mean TPOT
of 3.88 vs 3.15 ms (tiny, -19%) and 17.8 vs 24.0 ms (8B shape, +34%); no step-time model can
be held closer to one run than the engine is to itself. Per-request TTFT also carries the phase
of the step in flight at arrival (up to one ~3-4 ms step here), which no step-time model can
predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_calibrate_tiny_model_and_heldout_fidelity(results_dir, device):
    from vllm_faultsim.harness.runs.calibrate import device_slug
    prof = results_dir / f"{device_slug()}-tiny-llama.json"
    fid = results_dir / "fidelity_tiny-llama.json"
    cmd = [sys.executable, "-m", "vllm_faultsim.harness.runs.calibrate", "--model", "tiny-llama", "--grid", "full",
           "--out", str(prof), "--heldout", "--heldout-out", str(fid),
           "--steps-out", str(results_dir / "calibration_steps_tiny.jsonl"),
           "--heldout-steps-out", str(results_dir / "heldout_steps_tiny.jsonl")]
    if os.environ.get("VLLM_FAULTSIM_DRYRUN") == "1":
        cmd.append("--dry-run")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    (results_dir / "calibrate_tiny.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    p, f = json.loads(prof.read_text()), json.loads(fid.read_text())
    assert p["vllm"] and p["fit"]["steps"] >= 50
    if os.environ.get("VLLM_FAULTSIM_DRYRUN") == "1":
        return  # timings of the stand-in mean nothing
    assert p["device"], p
    assert abs(p["fit"]["total_err_pct"]) <= 2.0, p["fit"]
    for metric in ("ttft", "tpot", "e2e"):
        assert abs(f[metric]["mean_err_pct"]) <= 35.0, (metric, f[metric])
