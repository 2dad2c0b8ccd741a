"""Decode speed of a ~100M Qwen3-MoE shape (random weights): tinylm eager and compiled against transformers.

    .venv/bin/python benchmarks/moe_decode.py --dtype bfloat16 --repeats 3

The model: hidden 512, 8 layers, 8 heads (2 K/V heads, head_dim 64), 8 experts of 768, top-2, untied head over
tinylm's tiny tokenizer vocabulary; written by tinylm.tiny as a Hugging Face folder that transformers loads too.
Batch 1: a 37-token prompt, 64 new tokens, greedy, EOS ignored, best of --repeats; batch 8: eight prompts of
10-17 tokens, 64 new tokens each, total tokens/s of one generate call. Compile time is reported apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import tinylm
from tinylm import tiny

from batch_decode import tinylm_batch
from decode import machine, tinylm_decode, transformers_decode

SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768)
PROMPT = list(range(3, 40))
BATCH = [PROMPT[:10 + i] for i in range(8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tiny.FAMILIES["moe_100m"] = dict(tiny.FAMILIES["qwen3_moe"], **SHAPE)
    folder = tiny.make_tiny("moe_100m", tempfile.mkdtemp() + "/moe", seed=0)
    print(f"machine: {machine()}; Qwen3-MoE {SHAPE}; {args.dtype}")
    print("| system | decode | batch 1 tok/s | batch 8 total tok/s | compile s |\n|---|---|---:|---:|---:|")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    transformers_decode(model, PROMPT, 8)
    theirs = max(transformers_decode(model, PROMPT, args.new_tokens)[1] for _ in range(args.repeats))
    print(f"| transformers | eager | {theirs:.1f} | | |", flush=True)
    del model
    for compiled in (False, True):
        llm = tinylm.load(folder, dtype=args.dtype, compile=compiled)
        start = time.perf_counter()
        llm.engine.warmup()
        compile_s = time.perf_counter() - start
        tinylm_decode(llm, PROMPT, 8)
        ours = max(tinylm_decode(llm, PROMPT, args.new_tokens)[1] for _ in range(args.repeats))
        batch = max(tinylm_batch(llm, BATCH, args.new_tokens) for _ in range(args.repeats))
        mode = "compiled" if compiled else "eager"
        print(f"| tinylm | {mode} | {ours:.1f} ({ours / theirs:.2f}x) | {batch:.1f} | "
              f"{compile_s if compiled else 0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
