"""`tinylm quantize MODEL OUT --policy P [--format tinylm|compressed-tensors]`: write a quantized checkpoint; with
--check, run the quality gate on it.

tinylm's layout stays the default: it holds every policy (mixed precision, a quantized embedding serving as the tied
head, W8A8) and tinylm's asymmetric int4. compressed-tensors (read by transformers and vLLM) holds int8 or int4
Linear layers with the embedding and head in float, int4 symmetric (tinylm/quant/compressed_tensors.py); it is asked
for by name, so the same command never silently changes a checkpoint's size or its int4 values."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tinylm.quant.policy import BUILTIN


def register(commands) -> None:
    policies = "; ".join(f"{name}: {p.description}" for name, p in BUILTIN.items())
    parser = commands.add_parser(
        "quantize", help="write a quantized checkpoint (int8, int4, w8a8, mixed-precision policies)",
        description=f"Policies: {policies}. Options go after the name: NAME:group_size=128,head_chunk=8192,"
                    "mlp_chunk=2048,kernel_dtype=model,int8_group_size=32,activations=int8.")
    parser.add_argument("model", metavar="MODEL", help="built-in name, Hugging Face folder or .gguf file")
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write (config.json with "
                        "quantization_config, model.safetensors, tokenizer, SHA256SUMS)")
    parser.add_argument("--policy", default="int8", help=f"one of {', '.join(BUILTIN)}, with options (default int8)")
    parser.add_argument("--format", default="tinylm", choices=["tinylm", "compressed-tensors"], dest="layout",
                        help="tinylm: every policy, read by tinylm (transformers refuses it); compressed-tensors: "
                             "int8 / int4 policies as transformers and vLLM load them (W8A16 / W4A16: Linear layers "
                             "quantized, int4 symmetric, embedding and head in the model dtype)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 or 256")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="activation dtype of the model (auto: bfloat16 where the CPU has it, else float32)")
    parser.add_argument("--check", action="store_true",
                        help="compare the saved checkpoint with the unquantized model on a fixed text (KL, top-1, "
                             "perplexity); exit status 1 when the policy fails its thresholds")
    parser.set_defaults(handler=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import tinylm
    from tinylm.cli_args import resolve_dtype
    from tinylm.quant.checkpoint import save_quantized
    from tinylm.quant.policy import parse_policy

    spec = args.policy + (f"{',' if ':' in args.policy else ':'}group_size={args.group_size}"
                          if args.group_size is not None else "")
    policy = parse_policy(spec)  # bad names and options fail here, before any weight is read
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty; choose a new folder")
    dtype = resolve_dtype(args.dtype, "cpu")
    if args.layout == "compressed-tensors":
        llm, policy = _compressed(args.model, dtype, policy, args.out)
    else:
        # mlp_chunk splits layers at load time: build unsplit, record it in the policy for later loads
        llm = tinylm.load(args.model, dtype=dtype, quantize=replace(policy, mlp_chunk=0))
        save_quantized(llm.model, args.out, policy, llm.tokenizer)
    note = ", embedding and head in float" if args.layout == "compressed-tensors" else ""
    print(f"wrote {args.out} ({args.layout}, policy {policy.spec}{note}, {_weight_mib(llm.model):.1f} MiB of weights)")
    if not args.check:
        return 0
    del llm
    from tinylm.quant.quality import evaluate

    report = evaluate(tinylm.load(args.model, dtype=dtype), tinylm.load(args.out, dtype=dtype), policy.spec)
    print(report.line())
    if not report.passed:
        print(f"tinylm: quality gate failed for policy {policy.spec}", file=sys.stderr)
        return 1
    return 0


def _compressed(model: str, dtype, policy, out: Path):
    """The float model loaded whole, then quantized in place to the policy's compressed form and written."""
    import tinylm
    from tinylm.quant.compressed_tensors import compressed_form, quantize_compressed, save_compressed_tensors

    policy = compressed_form(policy)  # a policy the format cannot hold fails here, before any weight is read
    llm = tinylm.load(model, dtype=dtype)
    quantize_compressed(llm.model, policy)
    save_compressed_tensors(llm.model, out, llm.tokenizer)
    return llm, policy


def _weight_mib(model) -> float:
    from tinylm.quant.memory import weight_bytes

    return weight_bytes(model) / 2**20
