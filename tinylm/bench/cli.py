"""`tinylm bench`'s flags and the run they describe (see tinylm/bench/__init__.py for what is measured)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tinylm.bench.shapes import SHAPES

CPU_NOTE = ("servers and their clients share this host's CPU: the clients are one asyncio process on the standard "
            "library (tinylm/bench/load.py); the bench process idles meanwhile")

REFERENCES = ["transformers", "llama.cpp", "llama.cpp:bf16", "llama.cpp:f16", "llama-server"]


def register(commands) -> None:
    from tinylm.cli_args import add_model_args

    bench = commands.add_parser("bench", help="decode, batch and serving speed and memory, side by side with "
                                "transformers and llama.cpp")
    add_model_args(bench)
    _add_bench_args(bench)
    bench.set_defaults(handler=cmd_bench)


def _add_bench_args(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--shape", choices=list(SHAPES), default=None, metavar="NAME",
                       help="instead of --model: random weights in a named model's dimensions (" + ", ".join(SHAPES)
                       + "), written to --work-dir")
    bench.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                       help="where --shape's model and llama.cpp's float GGUF copies are written and reused "
                            "(default: a temporary folder, removed after the run)")
    bench.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes to run (default 1)")
    bench.add_argument("--prompt-tokens", type=int, default=128, metavar="P",
                       help="seeded random token ids per prompt (default 128)")
    bench.add_argument("--new-tokens", type=int, default=128, metavar="N",
                       help="tokens generated per prompt, EOS ignored (default 128)")
    bench.add_argument("--repeats", type=int, default=3, metavar="R",
                       help="runs per system and batch size; the fastest end to end is reported (default 3)")
    bench.add_argument("--compare", default=None, metavar="SYSTEMS",
                       help="comma-separated references: transformers (same weights, same dtype), llama.cpp (the "
                            "GGUF as stored), llama.cpp:bf16 / llama.cpp:f16 (a float copy of it); llama.cpp "
                            "needs llama-cpp-python (pip install 'tinylm[bench]') and runs batch 1 only")
    bench.add_argument("--pairs", type=int, default=0, metavar="N",
                       help="then N rounds per batch size of every system back to back, the order rotating; adds "
                            "each ratio's median and lowest round (all systems stay loaded: no peak memory)")
    bench.add_argument("--variant", default=None, metavar="FLAGS",
                       help="A/B: also time tinylm with these flags over this run's, as the reference "
                            "'tinylm-variant' (e.g. --variant '--quantize w8a8 --kv-cache-dtype int8'; one flag "
                            "alone as --variant=--compile)")
    bench.add_argument("--serve", action="store_true",
                       help="time tinylm through `tinylm serve` (its own process, this run's model flags): each "
                            "prompt one streaming client, all at once, the clients in another process; tinylm's "
                            "own llm.stream is then the reference 'tinylm-stream'")
    bench.add_argument("--clients", type=int, nargs="+", default=None, metavar="N",
                       help="--serve with these numbers of clients (the batch sizes: --serve --batch N ...)")
    bench.add_argument("--json-schema", default=None, metavar="NAME|FILE",
                       help="also time tinylm and each llama.cpp system with every reply constrained to this JSON "
                            "schema (the built-in 'records', or a file), as 'tinylm+json' and 'llama.cpp+json'")
    bench.add_argument("--threads", type=int, default=None, metavar="T",
                       help="torch intra-op threads (and llama.cpp's)")
    bench.add_argument("--json", action="store_true", help="print one JSON document (command, machine, ISA, date, "
                       "versions, figures, ratios) instead of tables; render it with python -m tinylm.bench.report")


def cmd_bench(args) -> int:
    import torch

    from tinylm.bench import report, runner
    from tinylm.cli_args import load_from_args

    references = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tinylm-bench-")))
        work_dir.mkdir(parents=True, exist_ok=True)  # a --work-dir that does not exist yet
        load_args = _load_args(args, work_dir)
        start = time.perf_counter()
        llm = load_from_args(load_args)
        load_s = time.perf_counter() - start
        plan = _plan(args, llm)
        measured = runner.Measured(model={"source": str(llm.loaded.source), "shape": args.shape})
        openers = _reference_openers(references, args, load_args, llm, work_dir, measured)
        subject = _subject(llm, args, load_args)
        del llm  # the subject holds the only reference: closing it frees the model before the next system loads
        runner.measure(subject, load_s, openers, plan, measured)
    document = _document(args, measured)
    print(json.dumps(document, indent=1, default=str) if args.json else report.render(document, heading=False))
    return 0


def _check_args(args) -> list[str]:
    """The references asked for; bad values fail here, in one line, before any model is loaded."""
    if args.clients:
        args.serve, args.batch = True, args.clients
    for name in ("prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 (decode is timed after the first), got {args.new_tokens}")
    if min(args.batch) < 1:
        raise ValueError(f"--batch sizes must be at least 1, got {min(args.batch)}")
    if args.pairs < 0 or (args.threads is not None and args.threads < 1):
        raise ValueError("--pairs must be at least 0 and --threads at least 1")
    if args.shape and args.model:
        raise ValueError("give --model or --shape, not both")
    references = [name.strip() for name in (args.compare or "").split(",") if name.strip()]
    unknown = [name for name in references if name not in REFERENCES]
    if unknown:
        raise ValueError(f"--compare: unknown system {unknown[0]!r}; choose from {', '.join(REFERENCES)}")
    if "transformers" in references and importlib.util.find_spec("transformers") is None:
        raise ValueError("--compare transformers needs transformers installed (pip install transformers)")
    if args.variant:
        _variant_args(args.variant, args)  # parsed again once --shape's folder exists; a bad flag fails now
    return list(dict.fromkeys(references))


def _load_args(args, work_dir: Path) -> argparse.Namespace:
    """The arguments tinylm is loaded with: --shape's folder, built now, standing for --model."""
    if not args.shape:
        return args
    from tinylm.bench.shapes import build_shape

    print(f"tinylm bench: the {args.shape} shape's random weights in {work_dir}", file=sys.stderr, flush=True)
    return argparse.Namespace(**{**vars(args), "model": str(build_shape(args.shape, work_dir))})


def _plan(args, llm):
    from tinylm.bench.runner import Plan

    context = llm.config.max_position_embeddings
    if args.prompt_tokens + args.new_tokens > context:
        raise ValueError(f"--prompt-tokens + --new-tokens exceed the model's context ({context})")
    return Plan(args.batch, args.prompt_tokens, args.new_tokens, args.repeats, args.pairs, llm.config.vocab_size)


def _subject(llm, args, load_args, name: str = "tinylm"):
    """tinylm as timed: through the Python API, or with --serve through `tinylm serve` in a process of its own."""
    from tinylm.bench.systems import TinyLMSystem

    label = tinylm_label(load_args, llm)
    if not args.serve:
        return TinyLMSystem(llm, name, label)
    from tinylm.bench.serve import ServedTinyLMSystem

    return ServedTinyLMSystem(model_flags(load_args), max(args.batch), name, label, args.threads)


def model_flags(load_args) -> list[str]:
    """The model flags of this run (those that differ from their defaults), for `tinylm serve`."""
    from tinylm.cli_args import add_model_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    flags = []
    for key, default in vars(parser.parse_args([])).items():
        value = getattr(load_args, key, default)
        if value == default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, *map(str, value if isinstance(value, list) else [value])]
    return flags


def _stream_reference(llm, load_args):
    """--serve's reference: the same model through llm.stream in this process (what the server should match)."""
    from tinylm.bench.serve import StreamedTinyLMSystem

    label = tinylm_label(load_args, llm) + ", llm.stream in the bench process"
    return StreamedTinyLMSystem(llm, "tinylm-stream", label)


def tinylm_label(args, llm=None) -> str:
    """What tinylm ran, in words: "bfloat16 + w8a8, compiled, int8 K/V cache", "float32 (GGUF blocks),
    compiled"."""
    from tinylm.cli_args import resolve_dtype
    from tinylm.engine.compile_cache import compile_by_default
    from tinylm.model.invariant import weight_storage

    parts = [resolve_dtype(args.dtype, args.device) + (f" + {args.quantize}" if args.quantize else "")]
    storage = None if llm is None else weight_storage(llm.model)
    if storage is not None:  # float32 computed on GGUF blocks / bfloat16 weights (store_compact)
        parts[0] += f" ({storage})"
    compiled = compile_by_default() if args.compile is None else args.compile
    parts.append("compiled" if compiled else "eager")
    if args.device != "cpu":
        parts.append(f"on {args.device}")
    if args.kv_cache_dtype != "auto":
        parts.append(f"{args.kv_cache_dtype} K/V cache")
    if args.draft_model:
        parts.append(f"draft {args.draft_model}" + (f" ({args.draft_quantize})" if args.draft_quantize else ""))
    return ", ".join(parts)


def _reference_openers(references: list[str], args, load_args, llm, work_dir: Path, measured) -> list:
    """A function per reference that loads it when its turn comes; the ones that cannot run here get one note."""
    from tinylm.bench import systems
    from tinylm.cli_args import load_from_args, resolve_dtype

    source, dtype = Path(llm.loaded.source), resolve_dtype(args.dtype, args.device)
    context = max(512, args.prompt_tokens + args.new_tokens)
    openers = [lambda: _stream_reference(llm, load_args)] if args.serve else []
    if args.serve or "llama-server" in references:
        measured.note(CPU_NOTE)
    for name in references:
        if name == "transformers":
            openers.append(lambda: systems.TransformersSystem(source, dtype, args.device))
        elif name == "llama-server":
            openers += _llama_server_opener(source, args, measured)
        elif (reason := _llama_cpp_missing(source)) is not None:
            measured.note(f"{name}: skipped, {reason}")
        else:
            openers.append(lambda name=name: _llama_cpp(name, source, work_dir, context))
    if args.variant:
        variant = _variant_args(args.variant, load_args)
        openers.append(lambda: _subject(load_from_args(variant), args, variant, name="tinylm-variant"))
    if args.json_schema:
        openers += _constrained_openers(references, args, load_args, llm, work_dir, context, measured)
    return openers


def _llama_server_opener(source: Path, args, measured) -> list:
    from tinylm.bench.llama_server import LlamaServerSystem, llama_server_binary

    binary = llama_server_binary()
    if source.suffix != ".gguf" or binary is None:
        why = "it runs GGUF files (give --model FILE.gguf)" if binary else \
            "no llama-server binary (build it: tinylm/bench/llama_server.py; or set $TINYLM_LLAMA_SERVER)"
        measured.note(f"llama-server: skipped, {why}")
        return []
    slot_context = args.prompt_tokens + args.new_tokens + 16
    return [lambda: LlamaServerSystem(binary, source, max(args.batch), slot_context)]


def _constrained_openers(references, args, load_args, llm, work_dir: Path, context: int, measured) -> list:
    """--json-schema: tinylm and each llama.cpp reference again, every reply constrained to the schema."""
    from tinylm.bench import constraint
    from tinylm.bench.systems import TinyLMSystem
    from tinylm.cli_args import load_from_args

    schema = constraint.load_schema(args.json_schema)
    measured.note(f"JSON schema {args.json_schema!r} compiles in {constraint.compile_seconds(llm, schema) * 1e3:.1f} "
                  "ms for tinylm (llguidance)")
    label = f"{tinylm_label(load_args)}, JSON schema {args.json_schema!r}"
    openers = [lambda: TinyLMSystem(load_from_args(load_args), "tinylm+json", label, schema)]
    source = Path(llm.loaded.source)
    for name in references:
        if name.startswith("llama.cpp") and _llama_cpp_missing(source) is None:
            openers.append(lambda name=name: _llama_cpp(name, source, work_dir, context,
                                                        constraint.llama_cpp_grammar(schema)))
    return openers


def _llama_cpp_missing(source: Path) -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed (pip install 'tinylm[bench]', or llama-cpp-python)"
    if source.suffix != ".gguf":
        return "it runs GGUF files and this model is a folder (give --model FILE.gguf)"
    return None


def _llama_cpp(name: str, source: Path, work_dir: Path, context: int, grammar=None):
    """llama.cpp on the GGUF (or a float copy of it); with a grammar, the constrained twin "NAME+json"."""
    from tinylm.bench.systems import LlamaCppSystem

    suffix, constrained = ("+json", ", JSON schema as GBNF") if grammar is not None else ("", "")
    if name == "llama.cpp":
        return LlamaCppSystem(source, name + suffix, f"{source.name} as stored{constrained}", context, grammar)
    from tinylm.bench.gguf_float import float_gguf

    kind = name.split(":")[1]
    copy = float_gguf(source, work_dir, kind)
    return LlamaCppSystem(copy, name + suffix, f"{kind.upper()} copy of {source.name} (dequantized by the gguf "
                          f"package){constrained}", context, grammar)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a ValueError: the CLI prints it as one line, no usage block
        raise ValueError(f"--variant: {message}")


def _variant_args(flags: str, load_args) -> argparse.Namespace:
    """This run's load arguments with the --variant flags over them (argparse keeps what the namespace has)."""
    from tinylm.cli_args import add_model_args

    parser = _OneLineParser(prog="--variant", add_help=False)
    add_model_args(parser)
    return parser.parse_args(shlex.split(flags), namespace=argparse.Namespace(**vars(load_args)))


def _document(args, measured) -> dict:
    from tinylm.bench import runner
    from tinylm.bench.timing import machine_info, utc_now, versions

    machine = machine_info()
    return {"command": command_line(args), "date": utc_now(), "machine": machine, "isa": machine["isa"],
            "versions": versions(), "settings": _settings(args), "model": measured.model, "systems": measured.systems,
            "results": [asdict(r) for r in measured.results], "ratios": runner.ratios(measured),
            "rounds": runner.rounds_document(measured), "notes": measured.notes}


def _settings(args) -> dict:
    return {key: value for key, value in vars(args).items() if key != "handler"}


def command_line(args) -> str:
    """The command that repeats this run: every flag that differs from its default."""
    from tinylm.cli_args import add_model_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    _add_bench_args(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["tinylm", "bench"]
    settings = _settings(args)
    for key, value in settings.items():
        if value == defaults.get(key) or (key in ("batch", "serve") and settings.get("clients")):
            continue  # --clients stands for --serve --batch
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(parts)
