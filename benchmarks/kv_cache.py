"""The int8 K/V cache against the model-dtype one, default model: quality (teacher-forced next-token distributions
over a fixed text) and decode speed of a batch at a long context, both engines in one process, alternating.

    .venv/bin/python benchmarks/kv_cache.py [--quantize w8a8] [--batch 16] [--context 1024] [--pairs 4]

Quality: the text (this repository's README, first 1024 tokens) is prefilled in chunks of 128 through the engine,
so every position attends to cached (for int8: quantized) keys and values; KL(auto || int8) per position, top-1
agreement, perplexity of each. Speed: --batch prompts of --context tokens each (slices of the same text), 64 new
tokens, greedy; decode tokens/s counts the steps after every sequence has its first token (prefill excluded).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tinylm
from tinylm import hub
from tinylm.bench.timing import machine_line
from tinylm.engine.engine import EngineConfig, LLMEngine

TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def teacher_forced_logits(llm, ids: list[int], kv_cache_dtype: str) -> torch.Tensor:
    """(len(ids), V) float32 logits, each position's from the engine's prefill over the paged cache."""
    engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids,
                       EngineConfig(kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=128))
    chunks, forward = [], engine.runner.forward

    def keep(rows, all_logits=False):
        out = forward(rows, all_logits=all_logits)
        if all_logits:
            chunks.append(out[0, -rows[0][1]:])
        return out

    engine.runner.forward = keep
    engine.add_request("text", ids, tinylm.SamplingParams(max_tokens=1), prompt_logprobs=0)
    while engine.has_unfinished():
        engine.step()
    return torch.cat(chunks)


def quality(llm) -> str:
    ids = llm.encode(TEXT)[:1024]
    exact, quantized = (teacher_forced_logits(llm, ids, kv).log_softmax(-1) for kv in ("auto", "int8"))
    kl = (exact.exp() * (exact - quantized)).sum(-1)
    targets = torch.tensor(ids[1:])[:, None]
    ppl = [float((-logp[:-1].gather(1, targets)).mean().exp()) for logp in (exact, quantized)]
    top1 = float((exact.argmax(-1) == quantized.argmax(-1)).float().mean())
    return (f"KL mean {kl.mean():.4f}, max {kl.max():.3f}; top-1 agreement {top1:.1%}; "
            f"perplexity {ppl[0]:.2f} (auto) -> {ppl[1]:.2f} (int8)")


def decode_speed(llm, prompts: list[list[int]]) -> float:
    engine = llm.engine
    params = tinylm.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{id(prompts)}-{i}-{time.perf_counter()}", prompt, params)
    started, tokens, start = set(), 0, None
    while engine.has_unfinished():
        outputs = engine.step()
        if start is not None:
            tokens += len(outputs)
        started |= {out.request_id for out in outputs}
        if start is None and len(started) == len(prompts):
            start = time.perf_counter()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    path = hub.resolve(None)
    print(f"machine: {machine_line()}; model {path.name}, bfloat16{' + ' + args.quantize if args.quantize else ''}")
    llms = {kv: tinylm.load(path, dtype="bfloat16", quantize=args.quantize, compile=True, kv_cache_dtype=kv)
            for kv in ("auto", "int8")}
    print("quality:", quality(llms["auto"]))
    text_ids = llms["auto"].encode(TEXT * 4)
    prompts = [text_ids[i * 37:i * 37 + args.context] for i in range(args.batch)]
    for llm in llms.values():
        llm.engine.warmup()
        decode_speed(llm, prompts[:2])
    print(f"cache capacity (tokens, 1 GiB budget): auto {llms['auto'].engine.capacity_tokens}, "
          f"int8 {llms['int8'].engine.capacity_tokens}")
    for pair in range(args.pairs):
        auto, int8 = decode_speed(llms["auto"], prompts), decode_speed(llms["int8"], prompts)
        print(f"pair {pair}: {args.batch} x {args.context} tokens of context, decode tok/s: auto {auto:.1f}, "
              f"int8 {int8:.1f} ({int8 / auto:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
