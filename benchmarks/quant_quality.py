"""The quality gate for every quantization policy, side by side with the unquantized model in one process.

  .venv/bin/python benchmarks/quant_quality.py [--model M] [--dtype float32] [--policy P ...]

For each policy: mean KL(P_float || P_quant) and top-1 agreement over every position of a fixed text
(tinylm/quant/sample_text.py), perplexity of both on it, the gate's verdict, and how many answers of a 4-prompt
chat suite are the same greedy tokens as the unquantized model's (seed 003's smoke suite, as a second view).
On the default model the reference is the GGUF file dequantized: its linear layers are Q4_1, so `int4` (which keeps
those blocks) is nearly exact, while `int4:group_size=64` re-quantizes 4-bit values onto another grid.
"""

from __future__ import annotations

import argparse
import time

import torch

import tinylm
from tinylm.quant.memory import weight_bytes
from tinylm.quant.quality import Reference, evaluate

POLICIES = ["int8", "int4", "qkv-fp16", "int4-tiedq", "int4:group_size=64", "int8:kernel_dtype=model",
            "int4:kernel_dtype=model"]
SUITE = ["What is the capital of France?", "Explain what a neural network is in exactly 3 simple sentences.",
         "Write a Python function that reverses a string.", "Give me three tips for sleeping better."]
GREEDY = tinylm.SamplingParams(max_tokens=32, temperature=0.0)


def answers(llm: tinylm.LLM) -> list[list[int]]:
    return [llm.chat([{"role": "user", "content": q}], GREEDY)[0].token_ids for q in SUITE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--policy", action="append", default=None, help="repeatable; default: " + ", ".join(POLICIES))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reference_llm = tinylm.load(args.model, dtype=args.dtype)
    reference = Reference(reference_llm)
    expected = answers(reference_llm)
    print(f"model: {reference_llm.loaded.source.name}, activations {args.dtype}, {len(reference.ids)} tokens of text, "
          f"reference weights {weight_bytes(reference_llm.model) / 2**20:.1f} MiB")
    del reference_llm
    print("| policy | weights MiB | KL | top-1 agree | perplexity | vs float | same suite answers | gate "
          "(max KL / min top-1 / max ppl) | verdict | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for policy in args.policy or POLICIES:
        start = time.perf_counter()
        llm = tinylm.load(args.model, dtype=args.dtype, quantize=policy)
        load_s = time.perf_counter() - start
        report = evaluate(reference, llm, policy)
        same = sum(a == b for a, b in zip(answers(llm), expected))
        gate = report.gate
        limits = f"{gate.max_kl} / {gate.min_top1} / +{gate.max_ppl_increase:.0%}" if gate else "none"
        verdict = "PASS" if report.passed else "FAIL (" + "; ".join(report.failures) + ")"
        print(f"| {policy} | {weight_bytes(llm.model) / 2**20:.1f} | {report.kl:.4f} | {report.top1:.3f} | "
              f"{report.ppl:.3f} (float {report.ppl_reference:.3f}) | {report.ppl_increase:+.2%} | "
              f"{same}/{len(SUITE)} | {limits} | {verdict} | {load_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
