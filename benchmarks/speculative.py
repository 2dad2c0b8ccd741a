"""Speculative decoding at batch 1: the default model in bf16, drafted by a quantized copy of itself, against the
same model without a draft and against transformers bf16, in one run.

    .venv/bin/python benchmarks/speculative.py --repeats 3

Every tinylm configuration is compiled (`compile=True`; compile time not counted). Drafts: the same GGUF loaded
with `draft_quantize` int4 / int8 (a self-draft: the only other model of this tokenizer available offline), k
tokens per step. Greedy, 128 new tokens, EOS ignored; decode tokens/s = (tokens - 1) / time after the first
token, best of --repeats. Each row also says whether its tokens equal the draft-less run's (greedy speculative
decoding must give the target's own tokens) and the share of drafts accepted. transformers bf16 is measured again
after every tinylm configuration (the VM's speed drifts); ratios are against its best figure of the run.
"""

from __future__ import annotations

import argparse
import time

import torch

import tinylm
from tinylm import hub

from decode import PROMPT, best, load_transformers, machine, transformers_decode

LAST: dict[str, list[int]] = {}
CONFIGS = [(None, 0), ("int4", 3), ("int4", 5), ("int8", 3), ("int8", 5)]  # (draft quantization, k); None: no draft


def run(llm: tinylm.LLM, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, decode tokens/s, end-to-end tokens/s); the tokens are kept in LAST["ids"]."""
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start, first, ids = time.perf_counter(), None, []
    for event in llm.stream([prompt_ids], params):
        ids.append(event.token_id)
        first = first or time.perf_counter()
    end = time.perf_counter()
    LAST["ids"] = ids
    return first - start, (len(ids) - 1) / (end - first), len(ids) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gguf = hub.resolve(None)
    print(f"machine: {machine()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"target {gguf.name} bfloat16, compiled; batch 1; {args.new_tokens} new tokens")
    model = load_transformers(gguf, torch.bfloat16)
    prompt_ids = tinylm.load(gguf).encode(PROMPT)
    transformers_decode(model, prompt_ids, 8)
    reference = [best(lambda: transformers_decode(model, prompt_ids, args.new_tokens), args.repeats)[1]]
    rows, plain_ids = [], None
    for quantize, k in CONFIGS:
        llm = tinylm.load(gguf, dtype="bfloat16", compile=True, draft=gguf if quantize else None,
                          draft_quantize=quantize, num_speculative_tokens=max(k, 1))
        start = time.perf_counter()
        llm.engine.warmup()
        run(llm, prompt_ids, 16)
        compile_s = time.perf_counter() - start
        value = best(lambda: run(llm, prompt_ids, args.new_tokens), args.repeats)[1]
        plain_ids = plain_ids or LAST["ids"]
        drafter = llm.engine.drafter
        accepted = drafter.num_accepted / drafter.num_proposed if drafter and drafter.num_proposed else float("nan")
        rows.append((quantize or "none", k, value, accepted, LAST["ids"] == plain_ids, compile_s))
        reference.append(transformers_decode(model, prompt_ids, args.new_tokens)[1])
        print(f"  draft {quantize} k={k}: {value:.1f} tok/s, then transformers bf16 {reference[-1]:.1f}", flush=True)
        del llm
    base = max(reference)
    print(f"transformers bf16 over the run: {min(reference):.1f} to {base:.1f} tok/s ({len(reference)} runs); "
          "ratios against the best")
    print("| draft | k | tok/s | vs transformers bf16 | vs no draft | drafts accepted | same tokens | compile s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for draft, k, value, accepted, same, compile_s in rows:
        print(f"| {draft} | {k} | {value:.1f} | {value / base:.2f}x | {value / rows[0][2]:.2f}x | {accepted:.0%} | "
              f"{'yes' if same else 'NO'} | {compile_s:.0f} |")


if __name__ == "__main__":
    main()
