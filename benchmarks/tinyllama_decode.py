"""Batch-1 decode of a TinyLlama-1.1B-shaped model (seed 001's dimensions, random weights): tinylm in bf16, int8
and int4 against transformers bf16, in one run.

    .venv/bin/python benchmarks/tinyllama_decode.py --new-tokens 64 --repeats 2

The checkpoint (bf16 safetensors, ~2.2 GB) is written once to --workdir by tinylm's own exporter with a small
tokenizer; prompts are fixed token ids, so the tokenizer does not matter. Both sides decode greedily with EOS
ignored; decode tokens/s = (tokens - 1) / time after the first token, best of --repeats. tinylm's compiled rows
report their one-time compile apart (a first short run), not in the figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tinylm.config import ModelConfig
from tinylm.model.transformer import CausalLM
from tinylm.tiny import build_tokenizer, init_weights
from tinylm.weights.export import export_hf_folder

from decode import best, machine, tinylm_configs, tinylm_decode, transformers_decode

# TinyLlama-1.1B (seed 001): 22 layers, d 2048, 32 heads (GQA 4 KV heads), SwiGLU 5632, vocab 32000, context 2048
TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PROMPT_IDS = [1, 450, 4955, 310, 278, 4272, 310, 3681, 16410, 29879, 411, 278]
CONFIGS = [("bfloat16", None, False), ("bfloat16", None, True), ("float32", "int8", True), ("float32", "int4", True),
           ("bfloat16", "int4", True)]


def checkpoint(workdir: Path) -> Path:
    folder = workdir / "tinyllama-1.1b-random"
    if not (folder / "config.json").exists():
        model = CausalLM(ModelConfig.from_hf_dict(TINYLLAMA))
        init_weights(model, seed=0)
        export_hf_folder(model.to(torch.bfloat16), folder, tokenizer=build_tokenizer())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "tinylm" / "bench")
    args = parser.parse_args()
    folder = checkpoint(args.workdir)
    print(f"machine: {machine()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"TinyLlama-1.1B shape, random weights; batch 1; {len(PROMPT_IDS)}-token prompt; {args.new_tokens} new tokens")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    transformers_decode(reference, PROMPT_IDS, 4)
    base = best(lambda: transformers_decode(reference, PROMPT_IDS, args.new_tokens), args.repeats)[1]
    del reference
    print("| system | weights | decode | tok/s | vs transformers bf16 | compile s |")
    print("|---|---|---|---:|---:|---:|")
    print(f"| transformers | bfloat16 | eager | {base:.2f} | 1.00x | |", flush=True)
    rows = tinylm_configs(folder, CONFIGS, lambda llm: tinylm_decode(llm, PROMPT_IDS, 4),
                          lambda llm: best(lambda: tinylm_decode(llm, PROMPT_IDS, args.new_tokens), args.repeats)[1])
    for weights, mode, value, compile_s in rows:
        print(f"| tinylm | {weights} | {mode} | {value:.2f} | {value / base:.2f}x | {compile_s:.0f} |", flush=True)

if __name__ == "__main__":
    main()
