"""Fidelity on the committed real recordings (benchmarks/results/recordings: vLLM 0.26.0 as served on
one H200, three models x three loads), per recording, in three modes:

- ``zero-shot``: serving CPU costs and step-time correction fitted on the *other models'* six
  recordings (nothing of this model or recording; per-request and per-layer costs carry over);
- ``calibrated``: fitted on the other two loads of the same model (leave-one-load-out);
- ``calibrated-all``: fitted on the other eight recordings (leave-one-out).

The fit is ``vllm-faultsim fidelity --fit`` (harness/runs/fidelity.py ``fit``); aiconfigurator-core
gives the forward time in every mode.

    python benchmarks/fidelity_table.py [--out benchmarks/results/fidelity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_faultsim.harness.runs import fidelity as F

RECORDINGS = Path(__file__).parent / "results" / "recordings"
MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-30b-a3b")
LOADS = ("light", "near", "overload")
METRICS = ("ttft", "tpot", "e2e", "step")


def fit_sets(model: str, load: str) -> dict[str, list[Path]]:
    path = lambda m, l: RECORDINGS / f"{m}-{l}.jsonl.gz"  # noqa: E731
    return {"zero-shot": [path(m, l) for m in MODELS if m != model for l in LOADS],
            "calibrated": [path(model, l) for l in LOADS if l != load],
            "calibrated-all": [path(m, l) for m in MODELS for l in LOADS if (m, l) != (model, load)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'recording':<24} {'mode':<15} " + " ".join(f"{m.upper():>14}" for m in METRICS) + "   (MAPE % (bias %))")
    for model in MODELS:
        for load in LOADS:
            path = RECORDINGS / f"{model}-{load}.jsonl.gz"
            for mode, fit_on in fit_sets(model, load).items():
                fitted = F.fit(fit_on)
                f = F.fidelity(path, fitted)
                rows.append({"recording": path.name, "mode": mode, "fit_on": [p.name for p in fit_on],
                             "fitted": fitted, **{m: f.metrics[m] for m in METRICS}})
                print(f"{model + '-' + load:<24} {mode:<15} " + " ".join(
                    f"{f.metrics[m]['mape_pct']:>6.1f} ({f.metrics[m]['bias_pct']:+5.0f})" for m in METRICS), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
