"""Bounded loader fuzz: a few hundred seeded mutants of a tiny safetensors folder and a tiny GGUF (byte flips,
truncations, rewrites of header fields: counts, dims, offsets, lengths, config sizes) must each load or fail with a
one-line TinyLMError, within 5 s and 1 GB of memory above the worker's baseline.

The mutants run in a worker process (this file run as a module) so that a mutant which allocates without bound
hits the worker's address-space limit (RLIMIT_AS) instead of the machine, and one that hangs is killed by the
timeout; each outcome is written before the next mutant starts, so a crash names the mutant that caused it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

MUTANTS = {"safetensors bytes": 70, "safetensors header": 70, "config": 60, "gguf bytes": 70, "gguf fields": 80}
MAX_SECONDS = 5.0
MAX_GROWTH_MB = 1024
ADDRESS_SPACE_HEADROOM = 3 << 30  # the worker may map 3 GB more than it has after start-up, then MemoryError
ROOT = Path(__file__).resolve().parents[2]


# --- the test (parent process)


def test_loader_fuzz(tmp_path):
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = tmp_path / "results.jsonl"
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.weights.test_fuzz", str(tmp_path), str(results)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fuzz worker hung; the last mutant started: {_records(results)[-1:]}")
    records = _records(results)
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}) after {records[-1:]}: {proc.stderr[-2000:]}"
    assert len(records) == sum(MUTANTS.values())
    bad = [r for r in records if verdict(r)]
    assert not bad, "\n".join(f"{verdict(r)}: {r}" for r in bad[:10])
    outcomes = {o: sum(r["outcome"] == o for r in records) for o in ("loaded", "refused")}
    assert outcomes["refused"] > len(records) // 3, outcomes  # the mutants do reach the checks
    print(f"fuzz: {len(records)} mutants {outcomes} in {time.monotonic() - start:.1f} s, slowest "
          f"{max(r['seconds'] for r in records):.2f} s, peak growth {max(r['growth_mb'] for r in records):.0f} MB")


def verdict(record: dict) -> str:
    """What is wrong with one mutant's outcome ('' when nothing is)."""
    if record["outcome"] not in ("loaded", "refused"):
        return "not a TinyLMError"
    if record["outcome"] == "refused" and "\n" in record["error"]:
        return "a message of several lines"
    if record["seconds"] > MAX_SECONDS:
        return f"took over {MAX_SECONDS} s"
    if record["growth_mb"] > MAX_GROWTH_MB:
        return f"grew memory by over {MAX_GROWTH_MB} MB"
    return ""


def test_verdict_flags_each_failure():
    good = {"outcome": "refused", "error": "x: corrupt", "seconds": 0.1, "growth_mb": 3}
    assert verdict(good) == "" and verdict({**good, "outcome": "loaded"}) == ""
    assert verdict({**good, "outcome": "crashed"}) and verdict({**good, "error": "a\nb"})
    assert verdict({**good, "seconds": 6.0}) and verdict({**good, "growth_mb": 2048})


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


# --- the worker


def main(workdir: Path, results: Path) -> None:
    import torch

    torch.set_num_threads(1)
    bases = _make_bases(workdir)
    for path, quantize in ((bases["llama"], None), (bases["qwen3_next"], None), (bases["gguf"], None),
                           (bases["gguf"], "int8")):
        _load(path, quantize)  # warm every code path before the baseline is taken
    _limit_address_space()
    baseline = _peak_rss_mb()
    rng = random.Random(0)
    scratch = workdir / "mutant"
    with open(results, "w") as out:
        for index, (label, mutate, kind) in enumerate(_mutants(rng, bases)):
            shutil.rmtree(scratch, ignore_errors=True)
            path = mutate(scratch)
            quantize = "int8" if index % 8 == 7 else None  # every 8th through the streaming quantized path
            record = {"index": index, "label": label, "kind": kind, "quantize": quantize, **_load(path, quantize)}
            record["growth_mb"] = _peak_rss_mb() - baseline
            out.write(json.dumps(record) + "\n")
            out.flush()


def _load(path: Path, quantize) -> dict:
    from tinylm.errors import TinyLMError
    from tinylm.loading import load_model

    start = time.monotonic()
    try:
        load_model(path, quantize=quantize)
        outcome, error = "loaded", ""
    except TinyLMError as exc:
        outcome, error = "refused", str(exc)
    except BaseException as exc:  # noqa: BLE001 - recorded, and the test fails on it
        outcome, error = "crashed", f"{type(exc).__name__}: {exc}"[:500]
    return {"outcome": outcome, "error": error[:300], "seconds": round(time.monotonic() - start, 3)}


def _limit_address_space() -> None:
    with open("/proc/self/status") as status:
        size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kb * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _make_bases(workdir: Path) -> dict[str, Path]:
    from tests.weights.tiny_files import tiny_folder, tiny_gguf

    return {"llama": tiny_folder(workdir / "llama"), "qwen3_next": tiny_folder(workdir / "qwen3_next", "qwen3_next"),
            "gguf": tiny_gguf(workdir / "tiny.gguf")}


def _mutants(rng: random.Random, bases: dict[str, Path]):
    """(label, mutate(scratch) -> path to load, kind) for MUTANTS[kind] mutants of each kind, interleaved."""
    from tests.weights import fuzz_mutations as m

    makers = {"safetensors bytes": m.safetensors_bytes, "safetensors header": m.safetensors_header,
              "config": m.config_value, "gguf bytes": m.gguf_bytes, "gguf fields": m.gguf_field}
    kinds = [kind for kind, count in MUTANTS.items() for _ in range(count)]
    rng.shuffle(kinds)
    for kind in kinds:
        label, mutate = makers[kind](rng, bases)
        yield label, mutate, kind


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
