"""Trace reading speed and memory: synthetic files in the published layouts (Azure CSV, Mooncake
JSONL, BurstGPT CSV, ShareGPT JSON), each read into a workload by harness/trace_formats.py in a
fresh process; rows/s and the process's peak resident memory against the file's size.

    python benchmarks/trace_read_speed.py [--rows 1000000] [--out benchmarks/results/trace_read_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

CHILD = """
import json, resource, sys, time
from vllm_faultsim.harness import trace_formats as tf
kind, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
specs = tf.read(kind, {"path": path, **({"rate": 10.0} if kind == "sharegpt" else {})}, max_model_len=1 << 20)
wall = time.perf_counter() - t0
print(json.dumps({"requests": len(specs), "wall_s": round(wall, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def write(kind: str, path: Path, rows: int, rng: random.Random) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        if kind == "azure":
            fh.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
            t = datetime(2024, 5, 10)
            for _ in range(rows):
                t += timedelta(microseconds=rng.randrange(1, 200_000))
                fh.write(f"{t.isoformat(sep=' ')}+00:00,{rng.randrange(1, 8000)},{rng.randrange(1, 800)}\n")
        elif kind == "burstgpt":
            fh.write("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n")
            for i in range(rows):
                p, o = rng.randrange(1, 2000), rng.randrange(0, 500)
                fh.write(f"{i // 3},ChatGPT,{p},{o},{p + o},Conversation log\n")
        elif kind == "mooncake":
            nxt = 0
            for i in range(rows):
                n = rng.randrange(100, 16000)
                blocks = -(-n // 512)
                ids = list(range(nxt, nxt + blocks))
                nxt += blocks
                fh.write(json.dumps({"timestamp": i * 50, "input_length": n, "output_length": rng.randrange(1, 500),
                                     "hash_ids": ids}) + "\n")
        else:
            fh.write("[")
            for i in range(rows):
                turns = [{"from": "human", "value": "p" * rng.randrange(1, 3000)},
                         {"from": "gpt", "value": "q" * rng.randrange(1, 3000)}]
                fh.write(("," if i else "") + json.dumps({"id": str(i), "conversations": turns}))
            fh.write("]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per CSV/JSONL file (ShareGPT: a tenth)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trace_read_speed.json"))
    args = ap.parse_args()
    rng = random.Random(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("azure", "burstgpt", "mooncake", "sharegpt"):
            path = Path(tmp) / f"{kind}.trace"
            rows = args.rows // 10 if kind in ("sharegpt", "mooncake") else args.rows
            write(kind, path, rows, rng)
            out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out)
            r.update(rows=rows, file_mb=round(path.stat().st_size / 2**20, 1),
                     rows_per_s=round(rows / r["wall_s"]))
            results[kind] = r
            path.unlink()
            print(f"{kind:9s} {rows:>9,} rows  {r['file_mb']:7.1f} MB  {r['wall_s']:7.2f} s  "
                  f"{r['rows_per_s']:>9,} rows/s  peak RSS {r['peak_rss_mb']:7.1f} MB")
    record = {"benchmark": "trace_read_speed", "python": platform.python_version(), "machine": platform.machine(),
              "date": datetime.now().strftime("%Y-%m-%d"), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded: {args.out}")


if __name__ == "__main__":
    main()
