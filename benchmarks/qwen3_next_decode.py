"""Decode speed of a seed-002-shaped Qwen3-Next (random weights), tinylm vs transformers, side by side in one run.

    .venv/bin/python benchmarks/qwen3_next_decode.py --dtypes float32 bfloat16 --new-tokens 128 --repeats 3

The model is transformers' Qwen3NextForCausalLM built from seed 002's table (hidden 128, 6 layers alternating
Gated DeltaNet / gated attention, 8 heads, 1 KV head, head_dim 32, 2 experts top-1 + shared expert, YaRN), saved
and loaded by tinylm, so both sides run the same weights. Batch 1, greedy, EOS ignored; prefill is timed apart;
decode tokens/s = (new tokens - 1) / decode time. Best of --repeats runs. tinylm runs eagerly and compiled
(`compile=True`: the decode step, DeltaNet state update and expert picking included, through torch.compile;
compile time not counted).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import tinylm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
from test_qwen3_next import build  # noqa: E402  (the parity tests' seed-002 model: one definition of the shape)


def tinylm_decode(llm: tinylm.LLM, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tokens/s, tokens) from the streaming API's token times."""
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamps, tokens = [], []
    start = time.perf_counter()
    for event in llm.stream([prompt], params):
        stamps.append(time.perf_counter())
        tokens.append(event.token_id)
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def transformers_decode(model, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, stopping_criteria=[Stamp()], pad_token_id=0)
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), out[0, len(prompt):].tolist()


def best(fn, repeats: int) -> tuple[float, float, list[int]]:
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    prompt = torch.randint(0, 1000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(machine())
    print(f"seed-002-shaped Qwen3-Next, batch 1, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
          f"best of {args.repeats}")
    print("| dtype | tinylm decode | tinylm tok/s | transformers tok/s | ratio | prefill ms (tinylm / transformers) "
          "| same greedy tokens |")
    print("|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as folder:
        hf, _ = build(Path(folder))
        for dtype in args.dtypes:
            ref = hf.to(getattr(torch, dtype))
            theirs = best(lambda: transformers_decode(ref, prompt, args.new_tokens), args.repeats)
            for compiled in (False, True):
                llm = tinylm.load(folder, dtype=dtype, compile=compiled)
                llm.engine.warmup()
                tinylm_decode(llm, prompt, 8)
                ours = best(lambda: tinylm_decode(llm, prompt, args.new_tokens), args.repeats)
                mode = "compiled" if compiled else "eager"
                print(f"| {dtype} | {mode} | {ours[1]:.1f} | {theirs[1]:.1f} | {ours[1] / theirs[1]:.2f} | "
                      f"{ours[0] * 1e3:.0f} / {theirs[0] * 1e3:.0f} | {ours[2] == theirs[2]} |", flush=True)


if __name__ == "__main__":
    main()
