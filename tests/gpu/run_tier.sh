#!/usr/bin/env bash
# The GPU tier in one go, as run on a lent H100/H200 (after `source /tmp/gpu-env.sh`) or any CUDA host.
#   bash tests/gpu/run_tier.sh tier     # pytest -m gpu (~4 min on an H100) + summary
#   bash tests/gpu/run_tier.sh 8b       # calibrate the Llama-3-8B-shaped profile + held-out trace (~2 min)
# Results go to $VLLM_FAULTSIM_RESULTS (default /tmp/gpu-results); with $OUT set (the device tool),
# a tarball of them and the logs are copied there.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_FAULTSIM_RESULTS=${VLLM_FAULTSIM_RESULTS:-/tmp/gpu-results}
mkdir -p "$VLLM_FAULTSIM_RESULTS"
PY=${PYTHON:-python3}
what=${1:-tier}
rc=0
if [ "$what" = tier ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import vllm, torch, simpy; print('vllm', vllm.__version__, 'torch', torch.__version__, 'simpy', simpy.__version__)"
  t0=$(date +%s)
  timeout ${TIER_TIMEOUT:-540} $PY -m pytest tests/gpu -m gpu -v -rs --durations=0 -p no:cacheprovider --timeout 450 \
      >"$VLLM_FAULTSIM_RESULTS/pytest.log" 2>&1
  rc=$?
  echo "pytest -m gpu: exit $rc in $(( $(date +%s) - t0 )) s"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E |[0-9.]+s call" "$VLLM_FAULTSIM_RESULTS/pytest.log" | grep -v "^INFO" | head -60
elif [ "$what" = 8b ]; then
  slug=$($PY -c 'from vllm_faultsim.harness.runs.calibrate import device_slug; print(device_slug())')
  t0=$(date +%s)
  timeout ${CAL_TIMEOUT:-480} $PY -m vllm_faultsim.harness.runs.calibrate --model llama3-8b-shape --grid full --heldout \
      --out "$VLLM_FAULTSIM_RESULTS/$slug-llama3-8b-shape.json" \
      --heldout-out "$VLLM_FAULTSIM_RESULTS/fidelity_llama3-8b-shape.json" \
      --steps-out "$VLLM_FAULTSIM_RESULTS/calibration_steps_8b.jsonl" >"$VLLM_FAULTSIM_RESULTS/calibrate_8b.log" 2>&1
  rc=$?
  echo "calibrate 8b: exit $rc in $(( $(date +%s) - t0 )) s"
  grep "calibrate:" "$VLLM_FAULTSIM_RESULTS/calibrate_8b.log"
  [ $rc = 0 ] || tail -30 "$VLLM_FAULTSIM_RESULTS/calibrate_8b.log"
fi
$PY benchmarks/gpu_fidelity.py summary "$VLLM_FAULTSIM_RESULTS" | tee "$VLLM_FAULTSIM_RESULTS/summary-$what.txt"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results-$what.tgz" -C "$(dirname "$VLLM_FAULTSIM_RESULTS")" "$(basename "$VLLM_FAULTSIM_RESULTS")"
  cp "$VLLM_FAULTSIM_RESULTS/summary-$what.txt" "$OUT/" 2>/dev/null || true
fi
exit $rc
