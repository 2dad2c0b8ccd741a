"""Memory of each quantization policy against a true int8 baseline (the Nano compact 3B card's table): weight bytes, resident memory
after load, and the peak while generating.

  .venv/bin/python benchmarks/quant_memory.py                     # default model (SmolLM2-135M-Instruct GGUF)
  .venv/bin/python benchmarks/quant_memory.py --model qwen2.5-3b  # Qwen2.5-3B shape, random weights
  .venv/bin/python benchmarks/quant_memory.py --speed --new-tokens 64   # eager decode tok/s per policy

Each policy runs in its own subprocess, so one measurement's heap never inflates the next. The 3B-shaped model is
built on the meta device and filled layer by layer with random bfloat16 weights that are quantized as they are
made (the same streaming path as a real load), so its peak stays near the quantized size. Resident figures are
/proc/self/status VmRSS and VmHWM (the peak is reset with /proc/self/clear_refs before generating).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from tinylm.bench.timing import figures, stream_stamps
from tinylm.weights.sources import Rows

POLICIES = ["int8", "int4", "qkv-fp16", "int4-tiedq"]
CHUNKED = {"default": "qkv-fp16:head_chunk=8192,mlp_chunk=512", "qwen2.5-3b": "qkv-fp16:head_chunk=16384,mlp_chunk=2048"}
FLOAT = {"default": ["float32", "bfloat16"], "qwen2.5-3b": ["bfloat16"]}
# Qwen2.5-3B-Instruct's config.json (Nano compact 3B's base model): tied embeddings, q/k/v biases, GQA 16:2.
QWEN25_3B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048,
             "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
             "hidden_act": "silu", "torch_dtype": "bfloat16"}


class RandomSource:
    """Random bfloat16 tensors, made one at a time as the quantized build asks for them (seeded by name)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def get(self, name: str) -> torch.Tensor:
        return self._rows(name, 0, self.shapes[name][0])

    def rows(self, name: str) -> Rows:
        return Rows(self.shapes[name], lambda a, b: self._rows(name, a, b))

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}:{start}".encode()))
        tensor = torch.empty(stop - start, *self.shapes[name][1:], dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            return tensor.fill_(1.0)
        return tensor.normal_(0.0, 0.02, generator=generator)

    def native(self, name: str, scheme: str) -> None:
        return None

    def saved(self, layer: str, names) -> None:
        return None  # no layer arrives already quantized

    def close(self) -> None:
        pass


def load_random_3b(policy: str | None):
    import tinylm
    from tinylm.config import ModelConfig
    from tinylm.quant.apply import build_quantized
    from tinylm.quant.policy import parse_policy
    from tinylm.weights.loader import LoadedModel, build_model

    model = build_model(ModelConfig.from_hf_dict(QWEN25_3B))
    source = RandomSource({name: tuple(t.shape) for name, t in model.state_dict().items()})
    if policy is None:  # unquantized bfloat16: every tensor filled, the head tied to the embedding
        for name, tensor in list(model.named_parameters()):
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(source.get(name), requires_grad=False))
        model.tie_weights()
    else:
        build_quantized(model, parse_policy(policy), source, torch.bfloat16)
    return tinylm.LLM(LoadedModel(model=model.eval(), tokenizer=None, source=Path("random"), format="random"))


def worker(model_name: str, policy: str, new_tokens: int, prompt_tokens: int) -> dict:
    import tinylm
    from tinylm.quant import memory

    baseline = memory.rss()  # the interpreter, torch and tinylm, before any weight
    start = time.perf_counter()
    quantize = None if policy in ("float32", "bfloat16") else policy
    if model_name == "qwen2.5-3b":
        llm = load_random_3b(quantize)
    else:  # the float baselines in their own dtype; quantized models compute in bfloat16
        llm = tinylm.load(dtype=policy if quantize is None else "bfloat16", quantize=quantize)
    load_s = time.perf_counter() - start
    memory.trim()
    result = {"policy": policy, "weight_bytes": memory.weight_bytes(llm.model), "rss_baseline": baseline,
              "by_kind": memory.bytes_by_kind(llm.model), "rss_load": memory.rss(),
              "peak_load": memory.peak_rss(), "load_s": load_s}
    prompt = list(range(100, 100 + prompt_tokens))
    memory.reset_peak()
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamps = stream_stamps(llm, [prompt], params)
    result.update(peak_generate=memory.peak_rss(), generate_s=stamps.tokens[0][-1] - stamps.start,
                  decode_tok_s=figures(policy, stamps, prompt_tokens).decode_tok_s if new_tokens > 1 else None)
    return result


def speed(policies: list[str], new_tokens: int, repeats: int, dtype: str) -> None:
    """Eager decode tok/s at batch 1 on the default model, every policy loaded in this one process and run in
    turns (best of `repeats`), so background load hits them alike; ratios against the first (unquantized)."""
    import tinylm

    llms = {p: tinylm.load(dtype=dtype, quantize=None if p == dtype else p) for p in policies}
    params = tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    first = llms[policies[0]]
    prompt = first.encode(first.apply_chat_template([{"role": "user", "content": "Tell me a story about a cat."}]))
    best = dict.fromkeys(policies, 0.0)
    for _ in range(repeats):
        for policy, llm in llms.items():
            rate = figures(policy, stream_stamps(llm, [prompt], params), len(prompt)).decode_tok_s
            best[policy] = max(best[policy], rate)
    print(f"| policy ({dtype} activations) | decode tok/s (batch 1, {new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads) | vs {policies[0]} |")
    print("|---|---:|---:|")
    for policy, rate in best.items():
        print(f"| {policy} | {rate:.1f} | {rate / best[policies[0]]:.2f} |")


def measure(model_name: str, policy: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model_name, "--policy", policy, "--new-tokens",
           str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _root()})
    if out.returncode != 0:
        raise SystemExit(f"{policy}: worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f}"


def table(model_name: str, rows: list[dict]) -> str:
    base = next((r for r in rows if r["policy"] == "int8"), None)
    lines = [f"model: {model_name}",
             "| policy | weight GiB | RSS after load GiB | peak while generating GiB | peak during load GiB | "
             "weights vs int8 | peak generating vs int8 | load s | decode tok/s (eager, batch 1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def ratio(key: str) -> str:
            return f"{r[key] / base[key]:.2f}" if base and r[key] and base[key] else "n/a"
        lines.append(f"| {r['policy']} | {gib(r['weight_bytes'])} | {gib(r['rss_load'])} | {gib(r['peak_generate'])}"
                     f" | {gib(r['peak_load'])} | {ratio('weight_bytes')} | {ratio('peak_generate')} | "
                     f"{r['load_s']:.1f} | {r['decode_tok_s'] or 0:.1f} |")
    lines.append(f"(RSS includes the interpreter, torch and tinylm before any weight: {gib(rows[0]['rss_baseline'])} GiB)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", choices=["default", "qwen2.5-3b"])
    parser.add_argument("--policy", action="append", default=None,
                        help="repeatable; default: the float baselines, " + ", ".join(POLICIES) + " and a chunked one")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--speed", action="store_true", help="instead: eager decode tok/s of the default model, "
                        "every policy in one process, in turns")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="--speed only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.model, args.policy[0], args.new_tokens, args.prompt_tokens)))
        return
    if args.speed:
        speed(args.policy or [args.dtype] + POLICIES, args.new_tokens, args.repeats, args.dtype)
        return
    policies = args.policy or FLOAT[args.model] + POLICIES + [CHUNKED[args.model]]
    rows = []
    for policy in policies:
        rows.append(measure(args.model, policy, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(args.model, rows))


if __name__ == "__main__":
    main()
