"""Serving under load: N concurrent streaming clients against `tinylm serve`, vs transformers' batched generate.

    .venv/bin/python benchmarks/serve_load.py --clients 1 4 16 64 --new-tokens 128

tinylm: the real server (uvicorn + engine, in this process) on the default model (--dtype, bf16 by default); N clients send
/v1/completions with stream=true at once, fixed prompts, 128 tokens each (EOS ignored). Time to first token is
measured by each client from its request to its first token; inter-token latency from consecutive tokens.
transformers: `generate` on the same N prompts as one left-padded batch, same dtype, same weights; a logits processor
timestamps every step (its TTFT is the batch prefill, its ITL the batch step). Both report total tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

import httpx
import torch

import tinylm
from tinylm import hub

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "List five facts about the planet Mars.",
    "What makes a good cup of tea? Answer in detail.",
    "Describe the city of Paris to someone who has never been there.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue? Explain it to a child.",
    "Summarize the plot of a detective novel you invent.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_client(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int) -> tuple[float, list[float], int]:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], len(times)


async def tinylm_load(url: str, clients: int, new_tokens: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    itl = [x for r in results for x in r[1]]
    return summary(sum(r[2] for r in results) / wall, ttft, itl)


def summary(tok_s: float, ttft: list[float], itl: list[float]) -> dict:
    return {"tok_s": tok_s, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99)}


def transformers_load(model, tokenizer, clients: int, new_tokens: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    stamp = Stamp()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([stamp]), pad_token_id=tokenizer.pad_token_id)
    wall = time.perf_counter() - start
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * clients
    itl = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    return summary(generated / wall, [stamp.times[0] - start] * clients, itl * clients)


def start_server(llm, max_num_seqs: int, compile_decode: bool = False):
    import threading

    import uvicorn

    from tinylm.engine.engine import EngineConfig
    from tinylm.server.app import ServerConfig, create_app

    engine = EngineConfig(max_num_seqs=max_num_seqs, compile=compile_decode)
    config = ServerConfig(model_name="smollm2", engine=engine)
    server = uvicorn.Server(uvicorn.Config(create_app(llm, config), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", default=None, help="tinylm side only: int8, int4 or a policy")
    parser.add_argument("--compile", action="store_true", help="tinylm side only: compiled decode (warmed up first)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    gguf = hub.resolve(None)
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; model {gguf.name}, "
          f"{args.dtype}, {args.new_tokens} new tokens per client; tinylm quantize={args.quantize}, "
          f"compile={args.compile}")
    llm = tinylm.load(gguf, dtype=args.dtype, quantize=args.quantize)  # the server builds its own engine
    url = start_server(llm, max(args.clients), args.compile)
    reference = None
    if not args.skip_transformers:
        import transformers

        from decode import load_transformers  # benchmarks/decode.py: dequantized once, then plain bf16 Linear

        reference = load_transformers(gguf, getattr(torch, args.dtype))
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    asyncio.run(tinylm_load(url, 1, 8))  # warm-up
    header = "| clients | system | total tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |"
    print(header + "\n|---|---|---:|---:|---:|")
    for clients in args.clients:
        rows = [("tinylm serve", asyncio.run(tinylm_load(url, clients, args.new_tokens)))]
        if reference is not None:
            rows.append(("transformers generate", transformers_load(reference, tokenizer, clients, args.new_tokens)))
        for name, r in rows:
            print(f"| {clients} | {name} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                  f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} |", flush=True)
        if len(rows) == 2:
            print(f"| {clients} | ratio tinylm / transformers | {rows[0][1]['tok_s'] / rows[1][1]['tok_s']:.2f}x | | |")


if __name__ == "__main__":
    main()
