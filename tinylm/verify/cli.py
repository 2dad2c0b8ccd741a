"""`tinylm verify MODEL`: the command line of tinylm.verify (transformers is imported only when it runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

NOTHING_TO_COMPARE = 2


def register(commands) -> None:
    parser = commands.add_parser(
        "verify", help="check a checkpoint against transformers: tokenizer, chat template, every layer, logits, "
                       "greedy tokens",
        description="Load MODEL in tinylm and in transformers (a GGUF file through transformers' GGUF loader) and "
                    "compare them on a fixed probe set. Exit status 0: within the dtype's tolerance; 1: not (the "
                    "first failing check, and layer, is named); 2: nothing to compare with.")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="built-in name, Hugging Face folder or .gguf file (default: the built-in model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="both sides compute in this dtype (default float32: differences are then bugs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reference", default=None, metavar="REF",
                        help="give transformers this checkpoint instead of MODEL: a converted, exported or "
                             "fine-tuned copy checked against its original (a GGUF export against its folder)")
    parser.set_defaults(handler=cmd_verify)


def cmd_verify(args) -> int:
    import tinylm
    from tinylm import verify

    if importlib.util.find_spec("transformers") is None:
        print("tinylm verify: transformers is not installed (pip install transformers): nothing to compare with",
              file=sys.stderr)
        return NOTHING_TO_COMPARE
    llm = tinylm.load(args.model, dtype=args.dtype, device=args.device)
    source = Path(llm.loaded.source)
    reference_source = Path(args.reference) if args.reference else source
    try:
        reference, reference_tokenizer = _reference(reference_source, llm.dtype, args.device)
    except (ValueError, KeyError, OSError) as exc:
        print(f"tinylm verify: transformers cannot load {reference_source.name} ({_one_line(exc)}): nothing to "
              "compare with",
              file=sys.stderr)
        return NOTHING_TO_COMPARE
    tolerance = verify.TOLERANCES[llm.dtype]
    report = verify.Report()
    print(f"tinylm verify: {source.name} ({llm.config.model_type}, {args.dtype}) against transformers' "
          f"{reference_source.name}", flush=True)
    if llm.tokenizer is not None:
        verify.compare_tokenizers(llm.tokenizer, reference_tokenizer, report)
    ids = llm.encode("\n\n".join(verify.PROBES))
    mine, theirs = verify.compare_layers(llm.model, reference, torch.tensor([ids], device=args.device), tolerance,
                                         report)
    verify.compare_logits(mine, theirs, tolerance, report)
    verify.compare_greedy(llm, reference, ids[:16], report)
    print("\n".join(report.lines))
    print("PASS" if report.passed else f"FAIL: {report.failures[0]}")
    return 0 if report.passed else 1


def _reference(source: Path, dtype: torch.dtype, device: str):
    """transformers' model and tokenizer of the same file (a GGUF is dequantized by transformers to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # its per-tensor bars would bury the report
    where = {"pretrained_model_name_or_path": str(source.parent), "gguf_file": source.name} \
        if source.suffix == ".gguf" else {"pretrained_model_name_or_path": str(source)}
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")
