"""The sandbox's limits enforced while a chat template runs: compiled code whose output buffers count what they
hold, an environment that checks `*`, `**`, `+`, `%`, `~` and str method calls before they run (the checks are
tinylm/template_budget.py), and the time limit (a watchdog thread that raises in the rendering thread, so even a
loop that calls no function stops).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Any

from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinylm.errors import TemplateError
from tinylm.template_budget import Budget, check_binop, check_printed, check_str_method, current_budget, text_size

class _RenderTimeout(BaseException):
    """Raised in the rendering thread by the watchdog. A BaseException, so no `except Exception` inside Jinja or a
    filter swallows it."""


# --- compiled code that counts what it produces

class _OutputBuffer(list):
    """The list a macro, `{% set %}` block, filter block or call block collects its output in: each piece counts
    against the render's work limit as it is added (one extra per piece, for the reference)."""

    __slots__ = ("_budget",)

    def __init__(self, budget: Budget):
        super().__init__()
        self._budget = budget

    def append(self, text: str) -> None:
        self._budget.produce(len(text) + 1)
        super().append(text)

    def extend(self, texts) -> None:
        texts = tuple(texts)
        self._budget.produce(sum(len(t) + 1 for t in texts))
        super().extend(texts)


class _BudgetedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with output buffers that count (_OutputBuffer) and `~` checking its operands' sizes
    before it joins them (a `~` that doubles a string 40 times would otherwise build a terabyte)."""

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    @optimizeconst
    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile:  # the same join function Jinja's own visit_Concat picks
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"{join}(environment.checked_parts((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write(")))")


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus the size checks: `*`, `**`, `+`, `%` and str method calls are checked before they run."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def call_binop(self, context, operator, left, right):
        check_binop(current_budget(), operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in a function of its own
        if isinstance(getattr(method, "__self__", None), str):
            args = check_str_method(current_budget(), method, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def output_buffer(self) -> _OutputBuffer:
        return _OutputBuffer(current_budget())

    def checked_parts(self, parts: tuple) -> tuple:
        budget = current_budget()
        budget.check(sum(len(p) if isinstance(p, str) else text_size(p, budget.limit) for p in parts), "a '~'")
        return parts


def finalize(value: Any) -> Any:
    """Every `{{ value }}` passes here before str(): a non-string is measured first (see check_printed)."""
    if not isinstance(value, str):
        check_printed(current_budget(), value)
    return value


# --- the time limit

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc


class _Watchdog:
    """One daemon thread for every render: when a render passes its deadline, it raises _RenderTimeout in the
    rendering thread (PyThreadState_SetAsyncExc), which Python delivers between bytecodes, so even a loop that calls
    no function stops. One thread, not a Timer per render: starting a thread costs five renders."""

    def __init__(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._deadlines: dict[object, tuple[float, int]] = {}  # token -> (time.monotonic() deadline, thread id)
        self._fired: set[object] = set()
        self._thread: threading.Thread | None = None

    def arm(self, token: object, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._lock:
            earliest = min((d for d, _ in self._deadlines.values()), default=None)
            self._deadlines[token] = (deadline, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="tinylm-template-watchdog", daemon=True)
                self._thread.start()
            elif earliest is None or deadline < earliest:
                self._changed.notify()

    def disarm(self, token: object) -> None:
        """Ends the token's watch. Under the lock, so the watchdog cannot fire in between: if it fired already and
        the exception is still pending (the render finished first), the pending exception is cleared."""
        with self._lock:
            self._deadlines.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                _set_async_exc(ctypes.c_ulong(threading.get_ident()), None)  # NULL clears a pending exception

    def _watch(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for token, (deadline, thread_id) in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[token]
                        self._fired.add(token)
                        _set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(_RenderTimeout))
                earliest = min((d for d, _ in self._deadlines.values()), default=None)
                self._changed.wait(None if earliest is None else earliest - now)


_WATCHDOG = _Watchdog()


def _new_watchdog_after_fork() -> None:
    global _WATCHDOG
    _WATCHDOG = _Watchdog()  # the child has no watchdog thread, and the lock may have been held at the fork


os.register_at_fork(after_in_child=_new_watchdog_after_fork)


def within_time_limit(seconds: float, work):
    """work(), stopped with a TemplateError once it has run `seconds`."""
    token, watchdog = object(), _WATCHDOG
    try:
        try:
            watchdog.arm(token, seconds)
            return work()
        finally:
            watchdog.disarm(token)
    except _RenderTimeout:
        watchdog.disarm(token)  # the exception may have arrived inside the first disarm, before it took the lock
        raise TemplateError(f"chat template exceeded its time budget of {seconds} s") from None
