"""`tinylm` command line: generate, chat, convert, info. Bad input ends in one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

import tinylm
from tinylm import hub
from tinylm.errors import TinyLMError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (TinyLMError, ValueError, OSError) as exc:
        return _fail(exc)
    except Exception as exc:  # last resort: still one line, with the way to see more
        if os.environ.get("TINYLM_DEBUG"):
            raise
        return _fail(exc, prefix="internal error: ", hint=" (set TINYLM_DEBUG=1 for a traceback)")


def _fail(exc: BaseException, prefix: str = "", hint: str = "") -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"tinylm: error: {prefix}{message}{hint}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description="Run small causal language models.")
    parser.add_argument("--version", action="version", version=f"tinylm {tinylm.__version__}")
    commands = parser.add_subparsers(metavar="COMMAND")

    gen = commands.add_parser("generate", help="raw completion of a prompt, printed as it streams")
    _model_args(gen)
    _sampling_args(gen, max_tokens=128)
    gen.add_argument("prompt", metavar="PROMPT", help="the text to continue; '-' reads it from stdin (without the "
                                                       "final newline)")
    gen.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="multi-turn chat; with -m, answer one message and exit",
                               epilog=REPL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(chat)
    _sampling_args(chat, max_tokens=256)
    chat.add_argument("-m", "--message", help="answer this one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(handler=cmd_chat)

    convert = commands.add_parser("convert", help="GGUF file -> Hugging Face folder (safetensors)")
    convert.add_argument("source", type=Path, metavar="SOURCE")
    convert.add_argument("dest", type=Path, metavar="DEST")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    convert.set_defaults(handler=cmd_convert)

    tiny = commands.add_parser("tiny", help="write a tiny random checkpoint of a family, with a small tokenizer")
    tiny.add_argument("arch", metavar="ARCH", help="llama, qwen2, qwen3, qwen3_moe, qwen3_next or qed")
    tiny.add_argument("out", type=Path, metavar="OUT")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=cmd_tiny)

    info = commands.add_parser("info", help="architecture, parameter count and bytes of a model")
    _model_args(info)
    info.set_defaults(handler=cmd_info)
    for module in _COMMAND_GROUPS:
        importlib.import_module(module).register(commands)
    return parser


# Packages that add their own subcommands: each has `register(commands)` (an argparse subparsers object) and keeps
# its heavy imports inside its handlers, so `tinylm chat` never pays for the server or the trainer.
_COMMAND_GROUPS: list[str] = ["tinylm.eval.cli", "tinylm.server.cli", "tinylm.train.cli", "tinylm.quant.cli",
                               "tinylm.bench"]


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="built-in name, Hugging Face folder or .gguf file (default: smollm2-135m-instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the CPU or GPU computes it natively, else float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantize", default=None, metavar="Q",
                        help="weight-only quantization applied at load: int8, int4, or a policy name (see `tinylm quantize`)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile: faster tokens after a one-time compile (about a minute "
                             "per graph on 2 cores, cached on disk); falls back to eager if compiling fails")
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


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
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
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if _cpu_has_native_bf16() else "float32"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_from_args(args) -> tinylm.LLM:
    return tinylm.load(args.model, dtype=resolve_dtype(args.dtype, args.device), device=args.device,
                       quantize=args.quantize, compile=getattr(args, "compile", False),
                       draft=getattr(args, "draft_model", None), draft_quantize=getattr(args, "draft_quantize", None),
                       num_speculative_tokens=getattr(args, "num_speculative_tokens", 3),
                       kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                       check_finite=not getattr(args, "no_check_finite", False))


def cmd_generate(args) -> int:
    params = sampling_params(args)
    prompt = _read_stdin_prompt() if args.prompt == "-" else args.prompt
    llm = load_from_args(args)
    _print_stream(llm, prompt, params)
    return 0


def _read_stdin_prompt() -> str:
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text  # `echo text |` adds a newline the prompt did not have


def cmd_chat(args) -> int:
    params = sampling_params(args)
    llm = load_from_args(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        history.append({"role": "user", "content": args.message})
        _print_stream(llm, llm.apply_chat_template(history), params)
        return 0
    return _repl(llm, history, params)


REPL_HELP = """chat commands:
  /help, /?             list the commands
  /reset, /clear        clear the history (the --system prompt stays)
  /exit, /quit, /bye    leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while an answer prints stops that answer and returns to the prompt; the part already printed stays in the
history as the model's reply, as it stays in llama.cpp's context (a second Ctrl-C quits at once)."""


def _repl(llm: tinylm.LLM, history: list[dict], params: tinylm.SamplingParams) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print("tinylm chat: type a message; /help lists the commands, Ctrl-D quits.", file=sys.stderr)
    start = list(history)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave cleanly
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip().startswith("/"):
            if _repl_command(line.strip(), history, start):
                return 0
            continue
        history.append({"role": "user", "content": line})
        try:
            answer, stopped = _print_stoppable_stream(llm, llm.apply_chat_template(history), params)
        except (TinyLMError, ValueError) as exc:  # e.g. the history outgrew the context: say so, keep the session
            history.pop()
            _fail(exc)
            continue
        if stopped and not answer:
            history.pop()  # stopped before a word: forget the question too, so the roles still alternate
        else:
            history.append({"role": "assistant", "content": answer})


def _repl_command(command: str, history: list[dict], start: list[dict]) -> bool:
    """Runs a /command; True when it ends the session. Messages go to stderr: stdout carries only answers."""
    name = command.split()[0].lower()
    if name in ("/exit", "/quit", "/bye"):
        return True
    if name in ("/help", "/?"):
        print(REPL_HELP, file=sys.stderr)
    elif name in ("/reset", "/clear"):
        history[:] = start
        print("history cleared", file=sys.stderr)
    else:
        print(f"unknown command {name}; /help lists the commands", file=sys.stderr)
    return False


class _StopOnInterrupt:
    """While an answer streams, Ctrl-C asks it to stop after the current token, so the engine is left between two
    steps (its request aborted by the stream's close), never in the middle of one; a second Ctrl-C interrupts at
    once. Signal handlers can only be set from the main thread: elsewhere Ctrl-C keeps its usual meaning."""

    def __enter__(self) -> _StopOnInterrupt:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
            signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def _on_interrupt(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _print_stoppable_stream(llm: tinylm.LLM, prompt, params: tinylm.SamplingParams) -> tuple[str, bool]:
    """The streamed answer, and whether Ctrl-C stopped it."""
    with _StopOnInterrupt() as stop:
        answer = _print_stream(llm, prompt, params, stop)
    if stop.requested:
        print("(stopped)", file=sys.stderr)
    return answer, stop.requested


def _print_stream(llm: tinylm.LLM, prompt, params: tinylm.SamplingParams, stop: _StopOnInterrupt | None = None
                  ) -> str:
    text = []
    stream = llm.stream(prompt, params)
    try:
        for event in stream:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            text.append(event.text)
            if stop is not None and stop.requested:
                break
    finally:
        stream.close()  # ends the request in the engine now, not whenever the generator is collected
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def cmd_convert(args) -> int:
    from tinylm.weights.convert import convert_gguf_to_hf

    dest = convert_gguf_to_hf(args.source, args.dest, dtype=args.dtype)
    print(f"wrote {dest}")
    return 0


def cmd_tiny(args) -> int:
    from tinylm.tiny import make_tiny

    print(f"wrote {make_tiny(args.arch, args.out, seed=args.seed)}")
    return 0


def cmd_info(args) -> int:
    info = load_from_args(args).info()
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        elif key == "bytes":
            value = f"{value:,} ({value / 2**20:.1f} MiB of weights in memory)"
        elif key == "file_bytes":
            value = f"{value:,} ({value / 2**20:.1f} MiB on disk)"
        print(f"{key:>13}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
