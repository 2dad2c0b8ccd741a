"""16 prompts at once, 128 new tokens each: total tokens/s of tinylm's configurations against transformers bf16
batch 16, in one run (issue 5, item 2).

    .venv/bin/python benchmarks/batch_decode.py --batch 16 --new-tokens 128 [--only w8a8]

transformers: `generate` on the N prompts as one left-padded bf16 batch (the GGUF dequantized, as in
benchmarks/decode.py), greedy, EOS suppressed by min_new_tokens. tinylm: `LLM.generate` on the same N prompts
(the engine batches them continuously), greedy, EOS ignored. Total tokens/s = N x new tokens / wall time,
prefill included, best of --repeats. Compiled configurations compile before timing (reported apart). transformers
runs again after each tinylm configuration; the ratios are against its best figure over the whole run.
"""

from __future__ import annotations

import argparse
import time

import torch

import tinylm
from tinylm import hub

from decode import load_transformers, machine, tinylm_configs
from serve_load import PROMPTS

CONFIGS = [("bfloat16", None, False), ("bfloat16", None, True), ("float32", None, True),
           ("bfloat16", "int8", True), ("bfloat16", "int4", True), ("bfloat16", "w8a8", True),
           ("bfloat16", "w8a8", True, {"kv_cache_dtype": "int8"})]


def transformers_batch(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return generated / (time.perf_counter() - start)


def tinylm_batch(llm: tinylm.LLM, prompts: list[str] | list[list[int]], new_tokens: int) -> float:
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, metavar="Q", help="only the tinylm configurations quantized with Q")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if args.only is None or c[1] == args.only]
    gguf = hub.resolve(None)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    print(f"machine: {machine()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"model {gguf.name}; {args.batch} prompts x {args.new_tokens} new tokens")
    import transformers

    model = load_transformers(gguf, torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    transformers_batch(model, tokenizer, prompts[:2], 4)
    reference = [transformers_batch(model, tokenizer, prompts, args.new_tokens) for _ in range(args.repeats)]
    rows = []
    for row in tinylm_configs(gguf, configs, lambda llm: tinylm_batch(llm, prompts[:2], 4),
                              lambda llm: max(tinylm_batch(llm, prompts, args.new_tokens) for _ in range(args.repeats))):
        rows.append(row)
        # the VM's speed drifts by 20% within minutes: transformers is measured again after every configuration
        # and the ratios are against its best figure of the whole run (the strictest reference)
        reference.append(transformers_batch(model, tokenizer, prompts, args.new_tokens))
        print(f"  {row[0]} {row[1]}: {row[2]:.1f} tok/s, then transformers {reference[-1]:.1f}", flush=True)
    base = max(reference)
    print(f"transformers bf16 over the run: {min(reference):.1f} to {base:.1f} tok/s ({len(reference)} runs)")
    print("| system | weights | decode | total tok/s | vs transformers bf16 (best of run) | compile s |")
    print("|---|---|---|---:|---:|---:|")
    print(f"| transformers | bfloat16 | eager | {base:.1f} | 1.00x | |")
    for weights, mode, value, compile_s in rows:
        print(f"| tinylm | {weights} | {mode} | {value:.1f} | {value / base:.2f}x | {compile_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
