"""`tinylm` command line: generate, chat, convert, info. Bad input ends in one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import tinylm
from tinylm import bench
from tinylm.cli_args import add_model_args, add_sampling_args, load_from_args, sampling_params
from tinylm.errors import TinyLMError
from tinylm.eval import cli as eval_cli
from tinylm.quant import cli as quant_cli
from tinylm.server import cli as server_cli
from tinylm.train import cli as train_cli
from tinylm.verify import cli as verify_cli



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
    add_model_args(gen)
    add_sampling_args(gen, max_tokens=128)
    gen.add_argument("prompt", metavar="PROMPT", help="the text to continue; '-' reads it from stdin (without the "
                                                       "final newline)")
    gen.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="multi-turn chat; with -m, answer one message and exit",
                               epilog=REPL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(chat)
    add_sampling_args(chat, max_tokens=256)
    chat.add_argument("-m", "--message", help="answer this one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(handler=cmd_chat)

    convert = commands.add_parser("convert", help="GGUF file -> Hugging Face folder (safetensors), or a Hugging Face "
                                                  "folder -> GGUF file (llama.cpp, Ollama)")
    convert.add_argument("source", type=Path, metavar="SOURCE", help="a .gguf file, or a Hugging Face folder")
    convert.add_argument("dest", type=Path, metavar="DEST", help="the folder, or the .gguf file, to write")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="GGUF -> folder: the dtype of the safetensors weights")
    convert.add_argument("--outtype", default="f16", help="folder -> GGUF: the type of the weight matrices, f32, f16, "
                                                          "bf16, q8_0, q5_0, q5_1, q4_0 or q4_1 (default f16)")
    convert.set_defaults(handler=cmd_convert)

    tiny = commands.add_parser("tiny", help="write a tiny random checkpoint of a family, with a small tokenizer")
    tiny.add_argument("arch", metavar="ARCH", help="llama, qwen2, qwen3, qwen3_moe, qwen3_next or qed")
    tiny.add_argument("out", type=Path, metavar="OUT")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=cmd_tiny)

    info = commands.add_parser("info", help="architecture, parameter count and bytes of a model")
    add_model_args(info)
    info.set_defaults(handler=cmd_info)
    for group in _COMMAND_GROUPS:
        group.register(commands)
    return parser


# Packages that add their own subcommands: each has `register(commands)` (an argparse subparsers object) and keeps
# its heavy imports inside its handlers, so `tinylm chat` never pays for the server or the trainer.
_COMMAND_GROUPS = (eval_cli, server_cli, train_cli, quant_cli, bench, verify_cli)


def cmd_generate(args) -> int:
    params = sampling_params(args)
    prompt = _read_stdin_prompt() if args.prompt == "-" else args.prompt
    llm = load_from_args(args)
    _compile_batch_one(llm)
    _print_stream(llm, prompt, params)
    return 0


def _read_stdin_prompt() -> str:
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text  # `echo text |` adds a newline the prompt did not have


def _compile_batch_one(llm: tinylm.LLM) -> None:
    """Compile (or load from the cache) the batch-1 decode graph before anything prints: generate and chat decode
    one sequence, so the batched graph is never compiled, and the compile's progress bar gets a line of its own
    instead of overwriting a streaming answer."""
    compiled = llm.engine.runner.compiled
    if compiled is not None:
        compiled.warmup(batches=(1,))


def cmd_chat(args) -> int:
    params = sampling_params(args)
    llm = load_from_args(args)
    _compile_batch_one(llm)
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
    if not args.source.exists():
        raise FileNotFoundError(f"{args.source}: no such GGUF file or Hugging Face folder")
    if args.source.is_dir():
        import warnings

        from tinylm.weights.gguf_writer import convert_hf_to_gguf

        with warnings.catch_warnings(record=True) as caveats:  # what llama.cpp cannot do as the model does
            warnings.simplefilter("always")
            dest = convert_hf_to_gguf(args.source, args.dest, outtype=args.outtype)
        for caveat in caveats:
            print(f"tinylm: warning: {caveat.message}", file=sys.stderr)
    else:
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
