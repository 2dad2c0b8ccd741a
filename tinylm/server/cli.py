"""`tinylm serve`: the OpenAI- and TGI-compatible HTTP server."""

from __future__ import annotations

import os
import sys
import threading


def register(commands) -> None:
    from tinylm.cli_args import add_model_args

    serve = commands.add_parser("serve", help="OpenAI- and TGI-compatible HTTP server with continuous batching")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the name clients use (default: the model argument)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together in one batch")
    serve.add_argument("--max-num-batched-tokens", type=int, default=512,
                       help="tokens per engine step; longer prompts are prefilled in chunks of this size")
    serve.add_argument("--kv-cache-memory", type=float, default=1.0, metavar="GIB",
                       help="memory for the paged KV cache, in GiB")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    serve.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests allowed to wait for a batch slot; more are answered with 429")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    serve.add_argument("--graceful-timeout", type=float, default=10.0,
                       help="seconds running requests may take to finish after SIGTERM; the rest end with an error "
                            "event")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="serve PEFT LoRA adapters (as `tinylm train` writes them) beside the model, unmerged: "
                            "each NAME is a model name on every route, several in one batch")
    serve.add_argument("--allow-runtime-lora", action="store_true",
                       help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (they read paths a request "
                            "names on this machine)")
    safety = serve.add_argument_group("serving safely (see README: Serving safely)")
    safety.add_argument("--api-key", default=os.environ.get("TINYLM_API_KEY"),
                        help="require `Authorization: Bearer KEY` on every route but /health "
                             "(default: $TINYLM_API_KEY)")
    safety.add_argument("--trust-request-chat-template", action="store_true",
                        help="let requests send their own chat template source (untrusted code; still sandboxed "
                             "and time-limited)")
    safety.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds one request may run, streaming included (408 / a final error event after)")
    safety.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request body (408 after)")
    safety.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client may take to send a request's headers (408 and closed after)")
    safety.add_argument("--max-messages", type=int, default=1024, help="chat messages per request")
    safety.add_argument("--max-prompt-bytes", type=int, default=None,
                        help="prompt text per request, refused before tokenizing (default: 32 bytes per context "
                             "token, at least 64 KiB)")
    safety.add_argument("--no-access-log", action="store_true", help="no log line per request on stderr")
    serve.set_defaults(handler=cmd_serve)


def server_config(args):
    from tinylm import hub
    from tinylm.engine.engine import EngineConfig
    from tinylm.server.app import ServerConfig
    from tinylm.server.protocol import MAX_MESSAGES

    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue", "max_body_bytes",
                 "num_speculative_tokens", "request_timeout", "body_timeout", "header_timeout", "max_messages",
                 "max_prompt_bytes"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.kv_cache_memory <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory}")
    if args.max_messages > MAX_MESSAGES:
        raise ValueError(f"--max-messages may be at most {MAX_MESSAGES}, got {args.max_messages}")
    engine = EngineConfig(block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_memory * 2**30),
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, max_queue=args.max_queue,
                          compile=_compile(args),
                          num_speculative_tokens=args.num_speculative_tokens,
                          kv_cache_dtype=args.kv_cache_dtype,
                          batch_invariant=getattr(args, "batch_invariant", "on") == "on")
    name = args.served_model_name or args.model or "smollm2-135m-instruct"
    return ServerConfig(model_name=name, max_body_bytes=args.max_body_bytes, engine=engine, api_key=args.api_key,
                        body_timeout=args.body_timeout, request_timeout=args.request_timeout,
                        max_messages=args.max_messages, max_prompt_bytes=args.max_prompt_bytes,
                        trust_request_chat_template=args.trust_request_chat_template,
                        sampling_defaults=hub.recommended_sampling(args.model),
                        lora_modules=lora_modules(args.lora_modules), allow_runtime_lora=args.allow_runtime_lora)


def _compile(args) -> bool:
    """--compile / --no-compile, else the default (compile_cache.compile_by_default), which LoRA adapters turn
    off: the engine serves them unmerged on the eager path only (engine.py, add_lora)."""
    from tinylm.engine.compile_cache import compile_by_default

    if args.compile is not None:
        return args.compile
    return compile_by_default() and not (args.lora_modules or args.allow_runtime_lora)


def lora_modules(values: list[str]) -> dict[str, str]:
    """--lora-modules NAME=PATH ... -> {name: path}."""
    modules = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH, got {value!r}")
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


def on_a_passing_thread(function):
    """function() on a thread that ends before this returns (its exception re-raised here).

    Loading, warming up and compiling run torch's parallel ops, and the thread that runs them keeps an OpenMP team
    for as long as it lives. The engine decodes on its own thread; with the main thread's team still alive beside
    its own, libgomp throttles every team's spin-waits and each decode step ran 35% slower (BENCHMARKS.md, Leads).
    A passing thread's team goes with it, so the engine thread's is the only one while serving."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001  (re-raised on the calling thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="tinylm-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cmd_serve(args) -> int:
    from tinylm.cli_args import load_from_args
    from tinylm.server.app import create_app
    from tinylm.server.http import make_server, uvicorn_config

    config = server_config(args)
    if config.engine.compile:
        print("tinylm: compiling the decode step (about a minute the first time, seconds once cached on disk; "
              "the batched step compiles while serving; --no-compile skips it)", file=sys.stderr, flush=True)
    app = on_a_passing_thread(lambda: create_app(load_from_args(args), config))
    uv_config = uvicorn_config(app, args.host, args.port, header_timeout=args.header_timeout,
                               graceful_timeout=args.graceful_timeout, access_log=not args.no_access_log)
    auth = ", API key required" if config.api_key else ""
    server = make_server(uv_config, f"tinylm: serving {config.model_name} on http://{args.host}:{args.port} "
                         f"(OpenAI /v1/completions, /v1/chat/completions; TGI /generate, /generate_stream{auth})",
                         app.state.tinylm)
    server.run()
    return 0 if server.started else 1
