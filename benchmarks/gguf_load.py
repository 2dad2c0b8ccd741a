"""What loading a GGUF file costs with no flags: seconds, resident memory after the load and its peak, and how the
linear layers are stored (on the file's own blocks, or as bfloat16 / float32 weights).

  .venv/bin/python benchmarks/gguf_load.py FILE.gguf [FILE.gguf ...] [--dtype float32]

Each file loads in its own subprocess (`tinylm.load(file, compile=False)`: the load only, no decode graph), so one
load's heap never inflates the next. Resident figures are /proc/self/status VmRSS (after the load, the file closed)
and VmHWM (the peak). The built-in model and a 1.1B-parameter Q4_1 file (TinyLlama's shape) are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(path: str, dtype: str) -> dict:
    start = time.perf_counter()
    import tinylm  # noqa: PLC0415 - timed with the load, as a user's first call
    from tinylm.model.block_linear import BlockLinear  # noqa: PLC0415

    llm = tinylm.load(path, dtype=dtype, compile=False)
    seconds = time.perf_counter() - start
    layers = collections.Counter()
    for name, module in llm.model.named_modules():
        if name.endswith("_proj") or name == "lm_head":
            weight = None if isinstance(module, BlockLinear) else getattr(module, "weight", None)
            layers["blocks" if weight is None else str(weight.dtype).removeprefix("torch.")] += 1
    return {"file": Path(path).name, "dtype": dtype, "load_s": seconds, "rss_mib": status_kib("VmRSS") / 1024,
            "peak_mib": status_kib("VmHWM") / 1024, "layers": dict(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.files[0], args.dtype)))
        return
    print("| file | dtype | load s | resident after load MiB | peak MiB | linear layers |")
    print("|---|---|---:|---:|---:|---|")
    for path in args.files:
        done = subprocess.run([sys.executable, __file__, "--worker", "--dtype", args.dtype, path],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{path}: {done.stderr.strip().splitlines()[-1]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        layers = ", ".join(f"{n} {kind}" for kind, n in sorted(r["layers"].items()))
        print(f"| {r['file']} | {r['dtype']} | {r['load_s']:.1f} | {r['rss_mib']:.0f} | {r['peak_mib']:.0f} | {layers} |")


if __name__ == "__main__":
    main()
