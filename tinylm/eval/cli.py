"""`tinylm eval perplexity` and `tinylm eval tasks`: the command line of tinylm.eval (heavy imports stay inside)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tinylm.eval.tasks import DEFAULT_TASKS, TASKS


def register(commands) -> None:
    parser = commands.add_parser("eval", help="perplexity and multiple-choice benchmarks, scored as lm-eval does")
    sub = parser.add_subparsers(metavar="EVAL_COMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
    _perplexity_parser(sub)
    _tasks_parser(sub)


def _common(parser: argparse.ArgumentParser, lists: bool) -> None:
    each = " (comma-separated to compare several)" if lists else ""
    parser.add_argument("--dtype", default="auto", help=f"auto, float32, bfloat16 or float16{each}")
    parser.add_argument("--quantize", default="none", help=f"none, int8 or int4{each}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=_positive, default=8 if lists else 1,
                        help="examples (distinct contexts, with all their choices) per forward" if lists
                        else "windows per forward")
    parser.add_argument("--context", type=_positive, default=None,
                        help="tokens the model reads per forward pass (default: the model's context length)")
    parser.add_argument("--add-bos", action="store_true",
                        help="let the tokenizer add its special tokens (lm-eval's add_bos_token; off by default)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile (about a minute to compile; pays on whole tasks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _perplexity_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="sliding-window perplexity, bits per byte and tokens/s of a text",
                       description="Sliding-window perplexity as lm-eval's rolling loglikelihood: every token scored "
                                   "once; windows of --context tokens advance by --stride (default: the context, "
                                   "which is lm-eval's; smaller strides overlap, as the transformers guide's).")
    p.add_argument("model", metavar="MODEL", help="built-in name, Hugging Face folder or .gguf file")
    p.add_argument("--data", type=Path, required=True,
                   help="a text file (one document), or .jsonl / .parquet with one document per row")
    p.add_argument("--field", default="text", help="the text field of JSONL / parquet rows (default: text)")
    p.add_argument("--stride", type=_positive, default=None, help="new tokens scored per window (default: context)")
    p.add_argument("--limit", type=_positive, default=None, help="only the first N documents")
    p.add_argument("--output", type=Path, default=None, help="also write the result to this JSON file")
    _common(p, lists=False)
    p.set_defaults(handler=cmd_perplexity)


def _tasks_parser(sub) -> None:
    from tinylm.eval.loading import __doc__ as layout

    rows = "\n".join(_layout_line(s) for s in TASKS.values())
    p = sub.add_parser("tasks", help="multiple-choice benchmarks (hellaswag, ARC, winogrande, commonsense_qa, mmlu)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score each choice by its log-likelihood as lm-evaluation-harness does and report "
                                   "acc, acc_norm and their stderr.",
                       epilog=f"Data files (the datasets' published layouts; nothing is downloaded):\n{rows}\n"
                              f"{layout.split(chr(10), 1)[1]}")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="built-in name, Hugging Face folder or .gguf file; with --series, a run folder of checkpoints")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--data-dir", type=Path, required=True, help="folder holding the task files (see below)")
    p.add_argument("--num-fewshot", type=_natural, default=0)
    p.add_argument("--limit", type=_positive, default=None, help="first N examples per task (per MMLU subject)")
    p.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the few-shot draw (lm-eval's: 1234)")
    p.add_argument("--output", type=Path, default=Path("tinylm_eval"),
                   help="results JSON per run, summary.csv and the resume cache (default: ./tinylm_eval)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write per-example results")
    p.add_argument("--compare", action="store_true", help="print the comparison table of this run's models")
    p.add_argument("--series", action="store_true", help="each MODEL is a training run: evaluate its checkpoints")
    p.add_argument("--tokens-per-step", type=_positive, default=None, help="for checkpoints named by step only")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="plot scores (against training tokens for a series, else side by side)")
    p.add_argument("--metric", default="primary", choices=["primary", "acc", "acc_norm"],
                   help="metric of the table, CSV and plot (primary: acc_norm for hellaswag/ARC, acc elsewhere)")
    _common(p, lists=True)
    p.set_defaults(handler=cmd_tasks)


def _layout_line(spec) -> str:
    where = f"DIR/{spec.folder}/{spec.subfolder + '/' if spec.subfolder else ''}{spec.eval_split}.*"
    original = spec.original_files.get(spec.eval_split)
    return (f"  {spec.name:<15}{where:<42}few-shot: {spec.fewshot_split} ({spec.sampler}); {spec.source}"
            + (f", or the original {original}" if original else ""))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _load(model: str, dtype: str, quantize: str, args):
    import tinylm
    from tinylm.cli_args import resolve_dtype

    dtype = resolve_dtype(dtype, args.device)
    llm = tinylm.load(model, dtype=dtype, device=args.device, quantize=None if quantize == "none" else quantize)
    if args.context and args.context > llm.config.max_position_embeddings:
        raise ValueError(f"--context {args.context} is longer than the model's context "
                         f"({llm.config.max_position_embeddings})")
    return llm, dtype


def cmd_perplexity(args) -> int:
    from tinylm.eval.data import read_documents
    from tinylm.eval.loglikelihood import Scorer
    from tinylm.eval.perplexity import perplexity

    documents = read_documents(args.data, args.field)[:args.limit]
    llm, dtype = _load(args.model, args.dtype, args.quantize, args)
    scorer = Scorer.from_llm(llm, max_length=args.context, add_bos=args.add_bos, compile=args.compile)
    result = perplexity(scorer, documents, stride=args.stride, batch_size=args.batch_size,
                        progress=not args.no_progress).as_dict()
    print(f"model: {args.model} ({dtype}, quantize={args.quantize})  data: {args.data}")
    print(f"documents {result['documents']}, tokens {result['tokens']:,}, bytes {result['bytes']:,}, "
          f"windows {result['windows']} (context {result['context']}, stride {result['stride']})")
    print(f"perplexity {result['perplexity']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
          f"byte perplexity {result['byte_perplexity']:.4f}  word perplexity {result['word_perplexity']:.4f}")
    print(f"tokens/s {result['tokens_per_s']:.1f}")
    if args.output:
        record = {"model": args.model, "dtype": dtype, "quantize": args.quantize, "data": str(args.data), **result}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def cmd_tasks(args) -> int:
    from tinylm.eval.loading import split_files
    from tinylm.eval.plot import plot_rows
    from tinylm.eval.results import format_table, summary_row, update_summary
    from tinylm.eval.tasks import resolve_tasks

    specs = resolve_tasks(args.tasks)
    for spec in specs:  # a missing file fails before any model loads
        split_files(args.data_dir, spec, spec.eval_split)
        if args.num_fewshot:
            split_files(args.data_dir, spec, spec.fewshot_split)
    rows = [summary_row(_run_variant(spec_models, dtype, quantize, specs, args), args.metric)
            for spec_models in _models(args) for dtype in _list(args.dtype) for quantize in _list(args.quantize)]
    update_summary(args.output / "summary.csv", rows)
    if args.compare or len(rows) > 1:
        print(format_table(rows))
    if args.plot:
        print(f"wrote {plot_rows(rows, args.plot, args.metric)}")
    return 0


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _models(args) -> list[tuple[str, str, int | None]]:
    """(model to load, its name in results, training tokens) for every model or checkpoint to evaluate."""
    from tinylm.eval.checkpoints import checkpoint_info, discover_series

    out = []
    for model in args.models:
        if args.series:
            out += [(str(c.path), c.path.name, c.tokens) for c in discover_series(Path(model), args.tokens_per_step)]
        else:
            path = Path(model)
            tokens = checkpoint_info(path, args.tokens_per_step).tokens if path.is_dir() else None
            out.append((model, path.stem if path.suffix == ".gguf" else path.name, tokens))
    return out


def _run_variant(model: tuple[str, str, int | None], dtype: str, quantize: str, specs, args) -> dict:
    from tinylm.eval.cache import model_fingerprint
    from tinylm.eval.loglikelihood import Scorer
    from tinylm.eval.results import format_run, write_json
    from tinylm.eval.runner import Settings, evaluate

    source, name, tokens = model
    llm, dtype = _load(source, dtype, quantize, args)
    scorer = Scorer.from_llm(llm, max_length=args.context, add_bos=args.add_bos, compile=args.compile)
    fingerprint = model_fingerprint(llm.loaded.source, dtype=dtype, quantize=quantize, device=args.device,
                                    max_length=scorer.max_length, add_bos=args.add_bos,
                                    **({"compile": True} if args.compile else {}))  # bf16 rounds differently
    settings = Settings(args.num_fewshot, args.limit, args.batch_size, args.fewshot_seed, not args.no_progress)
    start = time.time()
    results = evaluate(scorer, specs, args.data_dir, settings,
                       None if args.no_cache else args.output / "cache" / fingerprint)
    run = {"model": name, "source": str(llm.loaded.source), "dtype": dtype,
           "quantize": None if quantize == "none" else quantize, "device": args.device, "tokens": tokens,
           "fingerprint": fingerprint, "time": start, "seconds": round(time.time() - start, 3),
           "settings": {"tasks": [s.name for s in specs], "num_fewshot": args.num_fewshot, "limit": args.limit,
                        "batch_size": args.batch_size, "fewshot_seed": args.fewshot_seed,
                        "max_length": scorer.max_length, "add_bos": args.add_bos, "data_dir": str(args.data_dir)},
           "results": results}
    print(format_run(run))
    print(f"wrote {write_json(args.output, run)}")
    return run
