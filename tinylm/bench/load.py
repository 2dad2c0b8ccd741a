"""The serving benchmark's load generator: N streaming clients of an OpenAI /v1/completions server, in a process of
their own, on the standard library alone (asyncio streams, a hand-written HTTP/1.1 chunked reader).

Why its own process: clients in the server's process share its GIL and event loop, so what they cost is counted
as the server's. Why no HTTP library: on a 2-core host the clients take CPU from the server; a client that does
one `find` per event and one JSON parse per token is the cheapest honest one (httpx costs several times that).

    python -I tinylm/bench/load.py --url http://127.0.0.1:8000 --new-tokens 128 < prompts.json > stamps.json

stdin: a JSON list of prompts (token id lists or strings), one client each, all sent at once. stdout: one JSON
document {"tokens": [[seconds after the start, per token] per client], "errors": [...]}. Runs with `python -I`
(no tinylm import, no script folder on sys.path): starting it costs tens of milliseconds, not torch's seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

READ_LIMIT = 1 << 20  # bytes of one chunk-size line or header block asyncio may buffer


def request_bytes(host: str, path: str, body: dict) -> bytes:
    """One HTTP/1.1 POST with a JSON body (the connection closes after it: one request per client)."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode() + payload


def completion_body(prompt, new_tokens: int, extra: dict) -> dict:
    """Greedy, exactly new_tokens (EOS ignored: vLLM's and llama-server's `ignore_eos`), streamed with usage;
    `extra`: a server's own fields (llama-server's cache_prompt)."""
    return {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}


async def read_head(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, chunked) from the response's status line and headers."""
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2:
        raise ConnectionError(f"no HTTP response (got {status_line[:80]!r})")
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    return int(parts[1]), chunked


async def body_pieces(reader: asyncio.StreamReader, chunked: bool):
    """The response body as it arrives (chunked transfer decoded; else until the connection closes)."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF


def token_count(event: bytes, times: list[float], now: float) -> int | None:
    """Note one SSE event: a time per choice event, and the server's completion count from the usage event."""
    if not event.startswith(b"data:"):
        return None
    data = event[5:].strip()
    if data == b"[DONE]":
        return None
    parsed = json.loads(data)
    if "error" in parsed:
        raise RuntimeError(f"the server sent an error event: {parsed['error']}")
    if parsed.get("choices"):
        times.append(now)
    usage = parsed.get("usage")
    return usage.get("completion_tokens") if usage else None


async def one_client(url: str, body: dict, start: float) -> list[float]:
    """One streaming request: the time (seconds after `start`) of each token event, cut to the usage count (a
    server may send the finish reason in a last event of its own)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=READ_LIMIT)
    try:
        writer.write(request_bytes(parts.netloc, "/v1/completions", body))
        await writer.drain()
        status, chunked = await read_head(reader)
        times, count, buffer = [], None, b""
        async for piece in body_pieces(reader, chunked):
            now = time.perf_counter() - start
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            if status != 200:
                continue
            for event in events:
                count = token_count(event, times, now) or count
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {(buffer or b'')[:200].decode(errors='replace')}")
    finally:
        writer.close()
    count = body["max_tokens"] if count is None else count
    # llama-server holds back a token whose text ends inside a UTF-8 character and sends it with the next one: a
    # token without an event of its own counts as delivered with the last event
    return times[:count] + times[-1:] * (count - len(times)) if times else times


async def run_clients(url: str, prompts: list, new_tokens: int, extra: dict | None = None) -> dict:
    """Every client at once; per client its token times (an empty list and an error line if it failed)."""
    bodies = [completion_body(prompt, new_tokens, extra or {}) for prompt in prompts]
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(url, body, start) for body in bodies), return_exceptions=True)
    errors = [f"client {i}: {type(r).__name__}: {r}" for i, r in enumerate(results) if isinstance(r, BaseException)]
    tokens = [[] if isinstance(r, BaseException) else r for r in results]
    return {"tokens": tokens, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--extra", default="{}", help="JSON object of fields added to every request body")
    args = parser.parse_args(argv)
    prompts = json.load(sys.stdin)
    document = asyncio.run(run_clients(args.url, prompts, args.new_tokens, json.loads(args.extra)))
    json.dump(document, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
