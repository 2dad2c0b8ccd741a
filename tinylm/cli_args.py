"""Flags and helpers shared by tinylm's commands: which model to load and how, which sampling to use.

Library modules with a command line (tinylm/server/cli.py, tinylm/eval/cli.py, tinylm/quant/cli.py,
tinylm/train/setup.py, tinylm/bench) import these from here, never from tinylm/cli.py: that module only wires the
commands together, so nothing below it depends on it.
"""

from __future__ import annotations

import argparse

import tinylm
from tinylm import hub
from tinylm.llm_loading import native_bf16


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model (read back by load_from_args)."""
    parser.add_argument("--model", default=None,
                        help="built-in name, Hugging Face folder or .gguf file (default: smollm2-135m-instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the CPU or GPU computes it natively, else float32 (there a GGUF "
                             "file's Q4_0-Q8_0 and Q4_K-Q6_K weights keep their blocks, the float32 results "
                             "exactly, and other GGUF tensors and 16-bit checkpoints keep linear weights in bfloat16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantize", default=None, metavar="Q",
                        help="weight-only quantization applied at load: int8, int4, or a policy name (see `tinylm quantize`)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode through torch.compile (the default where a C++ compiler is present, unless "
                             "TINYLM_COMPILE=0): the first start compiles for about a minute on 2 cores, later ones "
                             "load the graphs from tinylm's cache; --no-compile decodes eagerly")
    parser.add_argument("--batch-invariant", default="on", choices=["on", "off"],
                        help="on (default): a request's tokens and logprobs are the same bits whatever else shares "
                             "its batch, however its prompt is chunked, and when scored later; off: the library "
                             "products, results that depend on the batch (on CPUs without native bfloat16 also "
                             "float32 weights: slower there)")
    parser.add_argument("--draft-model", default=None, metavar="D",
                        help="speculative decoding: a smaller model with the same tokenizer (or this one, with "
                             "--draft-quantize) proposes tokens that the model checks several at a time")
    parser.add_argument("--draft-quantize", default=None, metavar="Q", help="quantization of the draft model")
    parser.add_argument("--num-speculative-tokens", type=int, default=3, metavar="K",
                        help="tokens the draft proposes per step (default 3)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                        help="auto: K/V kept in the model's dtype; int8: half the cache memory and decode reads")
    parser.add_argument("--no-check-finite", action="store_true",
                        help="skip the load-time check that every weight is finite (no NaN or Inf): a faster load "
                             "of files you trust")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling flags of generate and chat (read back by sampling_params)."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    recommended = "default: the model's recommendation (generation_config.json, or the built-in model's card), else"
    parser.add_argument("--temperature", type=float, default=None, help=f"0 = greedy; {recommended} 0.6")
    parser.add_argument("--top-p", type=float, default=None, help=f"{recommended} 0.9")
    parser.add_argument("--top-k", type=int, default=None, help=f"{recommended} -1 (off)")
    parser.add_argument("--min-p", type=float, default=None, help=f"{recommended} 0")
    parser.add_argument("--repetition-penalty", type=float, default=None, help=f"{recommended} 1")
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")


SAMPLING_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_params(args) -> tinylm.SamplingParams:
    """The flags given; for those not given, the model's recommended sampling (hub.recommended_sampling), else
    tinylm's defaults (SAMPLING_DEFAULTS)."""
    chosen = {**SAMPLING_DEFAULTS, **hub.recommended_sampling(args.model)}
    chosen.update({k: getattr(args, k) for k in SAMPLING_DEFAULTS if getattr(args, k) is not None})
    chosen["top_k"] = int(chosen["top_k"])
    return tinylm.SamplingParams(
        max_tokens=args.max_tokens, **chosen, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=args.stop, seed=args.seed, ignore_eos=args.ignore_eos,
    )


def resolve_dtype(name: str, device: str) -> str:
    """--dtype auto: bfloat16 on CUDA and on CPUs that compute it natively, else float32."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if native_bf16("cpu") else "float32"


def load_dtype(args) -> str:
    """The dtype given to tinylm.load: where --dtype auto means float32 (a CPU without native bfloat16), tinylm.load's
    own "auto", which computes every model in float32 there too and stores the linear weights of GGUF files and
    16-bit checkpoints in bfloat16 (tinylm/llm_loading.py resolve_weight_dtype); elsewhere resolve_dtype's choice."""
    resolved = resolve_dtype(args.dtype, args.device)
    return "auto" if args.dtype == "auto" and resolved == "float32" else resolved


def load_from_args(args) -> tinylm.LLM:
    """tinylm.load with add_model_args' flags; flags a command lacks take tinylm.load's defaults."""
    return tinylm.load(args.model, dtype=load_dtype(args), device=args.device,
                       quantize=args.quantize, compile=getattr(args, "compile", None),
                       draft=getattr(args, "draft_model", None), draft_quantize=getattr(args, "draft_quantize", None),
                       num_speculative_tokens=getattr(args, "num_speculative_tokens", 3),
                       kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                       batch_invariant=getattr(args, "batch_invariant", "on") == "on",
                       check_finite=not getattr(args, "no_check_finite", False))
