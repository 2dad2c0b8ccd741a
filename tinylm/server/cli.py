"""`tinylm serve`: the OpenAI- and TGI-compatible HTTP server."""

from __future__ import annotations

import contextlib
import signal
import sys


def register(commands) -> None:
    from tinylm.cli import _model_args

    serve = commands.add_parser("serve", help="OpenAI- and TGI-compatible HTTP server with continuous batching")
    _model_args(serve)
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
                       help="seconds running requests may take to finish after SIGTERM")
    serve.set_defaults(handler=cmd_serve)


def server_config(args):
    from tinylm.engine.engine import EngineConfig
    from tinylm.server.app import ServerConfig

    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue", "max_body_bytes",
                 "num_speculative_tokens"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.kv_cache_memory <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory}")
    engine = EngineConfig(block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_memory * 2**30),
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, max_queue=args.max_queue,
                          compile=args.compile, num_speculative_tokens=args.num_speculative_tokens,
                          kv_cache_dtype=args.kv_cache_dtype)
    name = args.served_model_name or args.model or "smollm2-135m-instruct"
    return ServerConfig(model_name=name, max_body_bytes=args.max_body_bytes, engine=engine)


def cmd_serve(args) -> int:
    import uvicorn

    from tinylm.cli import load_from_args
    from tinylm.server.app import create_app

    config = server_config(args)
    llm = load_from_args(args)
    if args.compile:
        print("tinylm: compiling the decode step (about a minute per graph the first time; cached on disk)",
              file=sys.stderr, flush=True)
    app = create_app(llm, config)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                               timeout_graceful_shutdown=args.graceful_timeout)
    server = _make_server(uv_config, f"tinylm: serving {config.model_name} on http://{args.host}:{args.port} "
                          "(OpenAI /v1/completions, /v1/chat/completions; TGI /generate, /generate_stream)")
    server.run()
    return 0 if server.started else 1


def _make_server(config, ready_message: str):
    """A uvicorn.Server that prints one line once its socket is listening, not before."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(ready_message, file=sys.stderr, flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM / SIGINT start a graceful shutdown. uvicorn re-raises the signal once it is done, which
            ends the process as killed; a server that shut down cleanly exits 0 instead."""
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
