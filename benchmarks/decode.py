"""Decode speed at batch 1, tinylm vs transformers, side by side in one run, on the same GGUF weights.

    .venv/bin/python benchmarks/decode.py --dtypes float32 bfloat16 --new-tokens 128

Both sides decode greedily from the same prompt with EOS ignored, so they produce the same number of tokens.
Prefill is timed apart from decode; decode tokens/s = (new tokens - 1) / decode time; end-to-end tokens/s =
new tokens / (prefill + decode). Best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import tinylm
from tinylm import hub

PROMPT = "The history of the city of Paris begins"


def tinylm_decode(llm: tinylm.LLM, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, decode tokens/s, end-to-end tokens/s) from the streaming API's token times."""
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = None
    count = 0
    for _ in llm.stream([prompt_ids], params):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (count - 1) / (end - first), count / (end - start)


def transformers_decode(model, prompt_ids: list[int], new_tokens: int, **generate_kwargs) -> tuple[float, float, float]:
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, stopping_criteria=[Stamp()], pad_token_id=0, **generate_kwargs)
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps) / (stamps[-1] - start)


def load_transformers(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.to(dtype).eval()


def tinylm_configs(path, configs, warm, measure):
    """For each (dtype, quantize, compiled[, load keyword arguments]) in `configs`: load, warm up (compiling both
    decode graphs when asked), measure. Yields (weights label, "compiled" or "eager", measure's value, compile
    seconds or 0)."""
    for dtype, quantize, compiled, *extra in configs:
        options = extra[0] if extra else {}
        llm = tinylm.load(path, dtype=dtype, quantize=quantize, compile=compiled, **options)
        start = time.perf_counter()
        llm.engine.warmup()
        warm(llm)
        compile_s = time.perf_counter() - start if compiled else 0.0
        weights = f"{dtype} + {quantize}" if quantize else dtype
        if options.get("kv_cache_dtype", "auto") != "auto":
            weights += f", {options['kv_cache_dtype']} KV cache"
        yield weights, "compiled" if compiled else "eager", measure(llm), compile_s
        del llm


def best(fn, repeats: int) -> tuple[float, float, float]:
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs), max(r[2] for r in runs)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    gguf = hub.resolve(args.model)
    print(f"machine: {machine()}; model: {gguf.name}; batch 1; {args.new_tokens} new tokens; "
          f"threads {torch.get_num_threads()}")
    print(f"{'dtype':>9} | {'tinylm decode tok/s':>19} | {'transformers':>12} | {'ratio':>5} | "
          f"{'end-to-end tok/s (tinylm / hf)':>30} | prefill ms (tinylm / hf)")
    for dtype in args.dtypes:
        llm = tinylm.load(gguf, dtype=dtype)
        prompt_ids = llm.encode(PROMPT)
        tinylm_decode(llm, prompt_ids, 8)  # warm-up
        ours = best(lambda: tinylm_decode(llm, prompt_ids, args.new_tokens), args.repeats)
        del llm
        model = load_transformers(gguf, getattr(torch, dtype))
        transformers_decode(model, prompt_ids, 8)
        ref = best(lambda: transformers_decode(model, prompt_ids, args.new_tokens), args.repeats)
        del model
        print(f"{dtype:>9} | {ours[1]:19.1f} | {ref[1]:12.1f} | {ours[1] / ref[1]:5.2f} | "
              f"{ours[2]:14.1f} / {ref[2]:<13.1f} | {ours[0] * 1e3:.0f} / {ref[0] * 1e3:.0f}")


if __name__ == "__main__":
    main()
