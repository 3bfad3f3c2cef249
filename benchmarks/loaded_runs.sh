#!/bin/bash
# Consecutive test runs with both cores loaded by stress-ng (issue 15 item 6: CI that never flakes).
# A snapshot of one commit (git archive) is run, so that uncommitted edits do not enter the count:
#
#   nohup bash benchmarks/loaded_runs.sh COMMIT [N_PROCS=20] [N_DIFF=3] [OUT=/tmp/loaded-runs] &
#
# First the EPLB + engine-process tests (tests/diff/test_eplb_real_cpu.py, test_procs_diff.py,
# tests/sim/test_eplb.py, test_engine_procs.py) N_PROCS times, then the whole diff tier
# (pytest -m diff, which runs them too) N_DIFF times; the first runs stop early when what is left
# before DEADLINE (env, default 3 h from now) is only enough for the diff-tier runs (1.6x the last
# run each). One line a run in OUT/summary.txt: rc, seconds, load average, commit, pytest's last
# line; each run's log (-rsP: the matrices' per-case tables, skip reasons) in OUT/.
COMMIT=$1; N_PROCS=${2:-20}; N_DIFF=${3:-3}; OUT=${4:-/tmp/loaded-runs}
DEADLINE=$(date -u -d "${DEADLINE:-3 hours}" +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
SNAP=$OUT/snap-$COMMIT
SUM=$OUT/summary.txt
mkdir -p $OUT
rm -rf $SNAP && mkdir -p $SNAP && git -C $REPO archive $COMMIT | tar -x -C $SNAP || exit 1
cd $SNAP
export PYTHONPATH=$SNAP/src   # ahead of an editable install of the working tree
stress-ng --cpu 2 --timeout 4h > $OUT/stress.log 2>&1 &
SP=$!
trap 'kill $SP 2>/dev/null' EXIT
echo "# $(date -u +%FT%TZ) commit=$COMMIT stress-ng pid=$SP" >> $SUM
one() {  # LABEL I PYTEST-ARGS...
  label=$1; i=$2; shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if [ $left -lt 60 ]; then echo "$label $i not started: deadline" >> $SUM; exit 0; fi
  t0=$(date +%s)
  timeout -k 20 $left python -m pytest -q -p no:cacheprovider -rsP --durations=8 --basetemp=$OUT/tmp-$label-$i "$@" \
    > $OUT/$label-$i.log 2>&1   # basetemp kept: a failure's replay and re-check commands name its traces there
  rc=$?
  echo "$label $i rc=$rc $(( $(date +%s) - t0 )) s load=$(cut -d' ' -f1-3 /proc/loadavg) commit=$COMMIT $(tail -1 $OUT/$label-$i.log)" >> $SUM
}
last=0
for i in $(seq 1 $N_PROCS); do
  if [ $last -gt 0 ] && [ $(( DEADLINE - $(date +%s) - last )) -lt $(( N_DIFF * last * 16 / 10 )) ]; then
    echo "procs-eplb: stopped after $((i - 1)) runs to leave time for $N_DIFF diff-tier runs" >> $SUM; break
  fi
  t=$(date +%s)
  one procs-eplb $i tests/diff/test_eplb_real_cpu.py tests/diff/test_procs_diff.py tests/sim/test_eplb.py tests/sim/test_engine_procs.py
  last=$(( $(date +%s) - t ))
done
for i in $(seq 1 $N_DIFF); do one diff $i -m diff; done
echo "# done $(date -u +%FT%TZ)" >> $SUM
