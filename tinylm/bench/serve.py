"""`tinylm bench --serve`: tinylm timed through `tinylm serve` under N streaming clients. The server is a
`tinylm serve` process of its own, started with this run's model flags and no others (what a user gets); the
clients are a third process (tinylm/bench/load.py), so neither the bench's Python nor the clients' share the
server's GIL or event loop. Each of a batch's B prompts is one client streaming /v1/completions, all B at once.

The figures include HTTP, SSE and JSON, detokenizing, and the engine's continuous batching of B requests that
arrive together. On a 2-core host the clients take some CPU from the server; the load generator is made cheap for
that (one asyncio process, no HTTP library), and the note in the report says so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tinylm.bench.systems import WARM_TOKENS, TinyLMSystem, _greedy
from tinylm.bench.timing import stream_stamps
from tinylm.bench.timing import Stamps

START_TIMEOUT_S = 900  # a cold start compiles the decode graphs (minutes); a cached one takes about a minute
LOAD_SCRIPT = Path(__file__).with_name("load.py")


class ServedSystem:
    """A system behind an HTTP server process (self.server, set by the subclass), timed by the load generator on
    prompts made fresh for every run; `request_extra` is added to every request body."""

    request_extra: dict | None = None
    runs = 0

    def skip_reason(self, batch: int) -> str | None:
        return None

    def warm(self, prompts: list[list[int]]) -> None:
        self.run(prompts, WARM_TOKENS)

    def run(self, prompts: list[list[int]], new_tokens: int) -> Stamps:
        self.runs += 1
        return client_stamps(self.server.url, fresh_prompts(prompts, self.runs), new_tokens, self.request_extra)

    def close(self) -> None:
        self.server.stop()


class ServedTinyLMSystem(ServedSystem):
    def __init__(self, model_flags: list[str], max_clients: int, name: str, label: str,
                 threads: int | None = None) -> None:
        self.name, self.label = name, f"{label}, through `tinylm serve` (its own process), one streaming client " \
                                      "per prompt (another process)"
        flags = ["--max-num-seqs", str(max_clients)] if max_clients > 64 else []  # serve's default is 64
        env = {"OMP_NUM_THREADS": str(threads)} if threads else None
        self.server = ServerProcess([sys.executable, "-c", "from tinylm.cli import main; main()", "serve",
                                     *model_flags, *flags], "tinylm serve", env=env)
        wait_for_graphs(self.server.url)


def wait_for_graphs(url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the server's background compile ends (/metrics' tinylm:compile_in_progress 0): the server answers
    once its batch-1 graph is ready, and a run timed meanwhile would share the cores with the compiler."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            compiling = gauge_value(response.read().decode(), "tinylm:compile_in_progress")
        if not compiling:  # 0, or a server without the gauge
            return
        time.sleep(0.5)
    raise RuntimeError(f"the server was still compiling after {timeout_s:.0f} s")


def gauge_value(text: str, name: str) -> float | None:
    """The value of the unlabelled metric `name` in a Prometheus text exposition, None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


class StreamedTinyLMSystem(TinyLMSystem):
    """--serve's reference: llm.stream in the bench process, on the same fresh prompts as the servers get."""

    runs = 0

    def run(self, prompts: list[list[int]], new_tokens: int) -> Stamps:
        self.runs += 1
        return stream_stamps(self.llm, fresh_prompts(prompts, self.runs), _greedy(new_tokens, self.schema))


class ServerProcess:
    """A server started on a free local port, its output in a log file; ready once /health answers 200."""

    def __init__(self, command: list[str], name: str, port_flag: str = "--port", env: dict | None = None) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="tinylm-bench-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen([*command, port_flag, str(self.port)], stdout=self.log,
                                        stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode} before serving: "
                                   f"{self.tail()}")
            if health_ok(self.url):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /health within {START_TIMEOUT_S} s: {self.tail()}")

    def tail(self, lines: int = 3) -> str:
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or f"(no output; log {self.log.name})"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


def health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_prompts(prompts: list[list[int]], run: int) -> list[list[int]]:
    """The prompts rotated by `run` tokens: the same work, but the servers' prefix caches (tinylm's, llama-server's)
    find no block of an earlier run's prompts, whose prefill they would otherwise skip."""
    return [prompt[run % len(prompt):] + prompt[:run % len(prompt)] for prompt in prompts]


def client_stamps(url: str, prompts: list, new_tokens: int, extra: dict | None = None) -> Stamps:
    """The clients' run (tinylm/bench/load.py in a process of its own) as Stamps; a client that failed fails it."""
    command = [sys.executable, "-I", str(LOAD_SCRIPT), "--url", url, "--new-tokens", str(new_tokens),
               "--extra", json.dumps(extra or {})]
    done = subprocess.run(command, input=json.dumps(prompts), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr.strip().splitlines()[-1:]}")
    document = json.loads(done.stdout)
    if document["errors"]:
        raise RuntimeError(f"{len(document['errors'])} of {len(prompts)} clients failed; first: "
                           f"{document['errors'][0]}")
    short = [len(times) for times in document["tokens"] if len(times) != new_tokens]
    if short:
        raise RuntimeError(f"a client got {short[0]} tokens, not {new_tokens}")
    return Stamps(0.0, document["tokens"], None)
