"""Speculative decoding at batch 1: the default model in bf16, drafted by a quantized copy of itself, against the
same model without a draft and against transformers bf16, in one run.

    .venv/bin/python benchmarks/speculative.py --repeats 3

Every tinylm configuration is compiled (`compile=True`; compile time not counted). Drafts: the same GGUF loaded
with `draft_quantize` int4 / int8 (a self-draft: the only other model of this tokenizer available offline), or
prompt lookup ("[ngram]", no model), k tokens per step. Greedy, 128 new tokens, EOS ignored; decode tokens/s =
(tokens - 1) / time after the first token, from the fastest of --repeats runs (timed by tinylm/bench/timing.py, as
`tinylm bench` times). Each row also gives the share of drafts accepted and how many leading tokens equal the
draft-less run's (see same_prefix). transformers bf16 is measured again after every tinylm configuration (the VM's
speed drifts); ratios are against its best figure of the run. Last, transformers with its own prompt lookup
(`prompt_lookup_num_tokens=3`), for the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import time

import tinylm
from tinylm import hub
from tinylm.bench.systems import load_transformers
from tinylm.bench.timing import Result, best_of, figures, machine_line, stream_stamps, transformers_stamps

PROMPT = "The history of the city of Paris begins"  # real text: prompt lookup and drafts see real continuations
LAST: dict[str, list[int]] = {}
# (draft, its quantization, k): None = no draft; "self" = the same GGUF quantized; "[ngram]" = prompt lookup
CONFIGS = [(None, None, 0), ("self", "int4", 3), ("self", "int4", 5), ("self", "int8", 5), ("[ngram]", None, 3),
           ("[ngram]", None, 5)]


def run(llm: tinylm.LLM, prompt_ids: list[int], new_tokens: int) -> Result:
    """One greedy run's figures; its tokens are kept in LAST["ids"]."""
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamps = stream_stamps(llm, [prompt_ids], params)
    LAST["ids"] = stamps.ids[0]
    return figures("tinylm", stamps, len(prompt_ids))


def transformers_run(model, prompt_ids: list[int], new_tokens: int, **generate_kwargs) -> Result:
    return figures("transformers", transformers_stamps(model, [prompt_ids], new_tokens, **generate_kwargs),
                   len(prompt_ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gguf = hub.resolve(None)
    print(f"machine: {machine_line()}; target {gguf.name} bfloat16, compiled; batch 1; {args.new_tokens} new tokens")
    model = load_transformers(gguf, "bfloat16")
    prompt_ids = tinylm.load(gguf).encode(PROMPT)
    transformers_run(model, prompt_ids, 8)
    reference = [best_of(lambda: transformers_run(model, prompt_ids, args.new_tokens), args.repeats).decode_tok_s]
    rows, plain_ids = [], None
    for draft, quantize, k in CONFIGS:
        llm = tinylm.load(gguf, dtype="bfloat16", compile=True, draft=gguf if draft == "self" else draft,
                          draft_quantize=quantize, num_speculative_tokens=max(k, 1))
        start = time.perf_counter()
        llm.engine.warmup()
        run(llm, prompt_ids, 16)
        compile_s = time.perf_counter() - start
        value = best_of(lambda: run(llm, prompt_ids, args.new_tokens), args.repeats).decode_tok_s
        plain_ids = plain_ids or LAST["ids"]
        drafter = llm.engine.drafter
        accepted = drafter.num_accepted / drafter.num_proposed if drafter and drafter.num_proposed else float("nan")
        label = {None: "none", "self": f"self, {quantize}"}.get(draft, draft)
        rows.append((label, k, value, accepted, same_prefix(LAST["ids"], plain_ids), compile_s))
        reference.append(transformers_run(model, prompt_ids, args.new_tokens).decode_tok_s)
        print(f"  draft {label} k={k}: {value:.1f} tok/s, then transformers bf16 {reference[-1]:.1f}", flush=True)
        llm = None  # free this engine before the next loads (not `del`: the lambdas above name it)
    base = max(reference)
    lookup = best_of(lambda: transformers_run(model, prompt_ids, args.new_tokens, prompt_lookup_num_tokens=3),
                     args.repeats).decode_tok_s
    print(f"transformers bf16 over the run: {min(reference):.1f} to {base:.1f} tok/s ({len(reference)} runs); "
          f"ratios against the best; transformers with prompt lookup (3 tokens): {lookup:.1f} tok/s "
          f"({lookup / base:.2f}x)")
    print("| draft | k | tok/s | vs transformers bf16 | vs no draft | drafts accepted | tokens equal to no draft's "
          "| compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for draft, k, value, accepted, same, compile_s in rows:
        print(f"| {draft} | {k} | {value:.1f} | {value / base:.2f}x | {value / rows[0][2]:.2f}x | {accepted:.0%} | "
              f"{same} | {compile_s:.0f} |")


def same_prefix(ids: list[int], reference: list[int]) -> str:
    """How many leading tokens equal the draft-less run's. Greedy speculative decoding gives the target's tokens
    in exact arithmetic; in bf16 a verification batch rounds differently from a one-row step (another kernel,
    another summation order), so a near-tie can flip and the texts part there, as batch 1 and batch 16 do."""
    count = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))
    return "all" if count == len(reference) == len(ids) else f"first {count}"


if __name__ == "__main__":
    main()
