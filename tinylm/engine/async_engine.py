"""AsyncEngine: an LLMEngine stepped by one background thread, with an asyncio stream per request.

The server's event loop never runs the model: it validates a request, hands it to the engine thread, and awaits
StepOutputs on an asyncio.Queue (the request's own with `generate`, or one a caller shares between several
requests with `open`). torch releases the GIL inside its kernels, so HTTP stays responsive while a step runs. A
stream that is closed early (client disconnect, cancellation) aborts its request, which frees its KV blocks at the
start of the engine's next step.

Hand-off is per step, not per token: the engine thread wakes each event loop once per step, with every output of
that step for that loop (64 streams decoding are one wake-up, not 64), and the loop fills the queues. The engine
thread's own work per token is a tuple append: whatever it does is on the critical path of the next step.

The LLMEngine is usually an LLM's own (LLM.engine_for): while this wrapper holds it (from construction to
shutdown) it is the engine's `driver`, so the LLM neither steps it nor hands it to another server; at shutdown
the requests still in it end, and the LLM gets it back idle.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tinylm.engine.engine import LLMEngine
from tinylm.engine.sequence import StepOutput
from tinylm.sampling_params import SamplingParams


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    tag: object = None  # open(): outputs arrive as (tag, output); generate(): as output
    last_token: float | None = None
    finished: bool = False


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_output: Callable[[StepOutput, float, float | None], None] | None = None):
        """on_output(output, seconds since arrival, seconds since the previous token or None) feeds metrics."""
        if engine.driver is not None:
            raise RuntimeError("this LLMEngine is already driven by another AsyncEngine (one thread steps it)")
        engine.driver = self
        self.engine = engine
        self.on_output = on_output
        self._pending: deque[tuple] = deque()  # ("add", args) / ("abort", request_id), applied by the engine thread
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="tinylm-engine", daemon=True)
        self.last_error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # else the thread may still be in a step: the engine stays ours
            self._release_engine()

    def _release_engine(self) -> None:
        """The thread has stopped: end the requests it left in the engine (running, queued, or never applied),
        so that the engine's next user (its LLM, the next server) finds it idle."""
        self._pending.clear()
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        self.engine.driver = None

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       prompt_logprobs: int | None = None, constraint_gate: int | None = None, lora_id: int = 0
                       ) -> AsyncIterator[StepOutput]:
        """Stream a request's outputs. Bad input raises here, before the first output (call `validate` first to
        answer it before a response starts)."""
        queue: asyncio.Queue = asyncio.Queue()
        request_id = self.open(prompt_token_ids, params, queue, None, request_id, prompt_logprobs, constraint_gate,
                               lora_id)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self.close(request_id)

    def open(self, prompt_token_ids: list[int], params: SamplingParams, queue: asyncio.Queue, tag,
             request_id: str | None = None, prompt_logprobs: int | None = None, constraint_gate: int | None = None,
             lora_id: int = 0) -> str:
        """Start a request whose outputs (or its exception) arrive on `queue` as (tag, item): several requests may
        share one queue, with no task per request between the engine and the reader. Call close(request_id) when
        done reading (after its finished output, or early to abort it). Bad input raises here."""
        request_id = request_id or self.new_request_id()
        self.validate([prompt_token_ids], params)
        self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue, time.monotonic(), tag)
        self._submit(("add", request_id, prompt_token_ids, params, prompt_logprobs, constraint_gate, lora_id))
        return request_id

    def close(self, request_id: str) -> None:
        """The reader is done with a request: abort it if it has not finished (its KV blocks go at the next step)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            self._submit(("abort", request_id))

    async def call(self, function: Callable, *args):
        """function(*args) on the engine thread, between two steps (what changes the model, such as loading a LoRA
        adapter, must not run beside a forward); its result or exception here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(("call", function, args, loop, future))
        return await future

    @staticmethod
    def _call(function: Callable, args: tuple, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        try:
            result, error = function(*args), None
        except Exception as exc:  # noqa: BLE001  (handed to the caller)
            result, error = None, exc
        settle = (lambda: future.set_exception(error)) if error is not None else (lambda: future.set_result(result))
        loop.call_soon_threadsafe(lambda: None if future.done() else settle())

    def validate(self, prompts: list[list[int]], params: SamplingParams, copies: int = 1) -> None:
        """The engine's checks for `copies` requests of each prompt, with the queue counted from the streams open
        here: requests submitted but not yet applied by the engine thread are in flight too (called from the
        event loop, so never two at once)."""
        for prompt in prompts:
            self.engine.check_input(prompt, params)
        self.engine.check_room(len(self._streams), len(prompts) * copies)

    def _submit(self, command: tuple) -> None:
        self._pending.append(command)
        self._wakeup.set()

    def _run(self) -> None:
        while not self._stopping:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # an internal error: fail the running requests, keep serving the next ones
                self.last_error = exc
                self._fail_all(exc)
                continue
            self._publish(outputs)

    def _apply_pending(self) -> None:
        while self._pending:
            command = self._pending.popleft()
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            if command[0] == "call":
                self._call(*command[1:])
                continue
            _, request_id, prompt, params, prompt_logprobs, constraint_gate, lora_id = command
            if request_id not in self._streams:
                continue  # the client left before its request reached the engine
            try:
                self.engine.add_request(request_id, prompt, params, prompt_logprobs, constraint_gate, lora_id)
            except Exception as exc:
                self._deliver(request_id, exc)

    def _publish(self, outputs: list[StepOutput]) -> None:
        """One wake-up per event loop for all of a step's outputs (metrics included: they run on the loop too)."""
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.finished = output.finish_reason is not None
            batches.setdefault(stream.loop, []).append((stream, output, now))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(self._hand_over, batch)

    def _hand_over(self, batch: list) -> None:
        """On the event loop: a step's outputs into their queues, and their timings into the metrics."""
        for stream, output, now in batch:
            if self.on_output is not None:
                since_last = None if stream.last_token is None else now - stream.last_token
                self.on_output(output, now - stream.arrival, since_last)
            stream.last_token = now
            stream.queue.put_nowait(output if stream.tag is None else (stream.tag, output))

    def _deliver(self, request_id: str, item) -> None:
        """An exception for one request (its add failed, or the engine failed)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished = True
            put = stream.queue.put_nowait
            stream.loop.call_soon_threadsafe(put, item if stream.tag is None else (stream.tag, item))

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"internal error while generating: {exc}"))
