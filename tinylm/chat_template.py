"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

Chat templates come from model repos: they are untrusted code. They run in Jinja's ImmutableSandboxedEnvironment with
the same options, filters and globals as transformers (`_cached_compile_jinja_template` and `render_jinja_template` in
transformers/utils/chat_template_utils.py), so a template renders the same text here as there, and the inputs are
rebuilt from plain JSON types first, so no object with dangerous methods reaches the template.

Templates also come from requests (when a server allows it), so a render has a budget: a time limit that also stops
pure-Python loops (a watchdog raises an exception in the rendering thread), an output limit, and size checks on the
operations that could allocate far more than the output limit in one step (`'a' * 10**9`, `2 ** 10**9`, a `~` or
`+` that doubles a string, a filter or str method with a huge width). Any overrun is a one-line TemplateError.
"""

from __future__ import annotations

import contextvars
import ctypes
import dataclasses
import functools
import itertools
import json
import os
import re
import string
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SecurityError

from tinylm.errors import TemplateError

# Names a message's reasoning is passed under; templates read the first (transformers' `_REASONING_FIELDS`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Older Jinja releases have known sandbox escapes, and templates are untrusted: refuse them, as transformers does
_JINJA_IS_SAFE = tuple(int(n) for n in re.findall(r"\d+", jinja2.__version__)[:3]) >= (3, 1, 6)

# --- the render budget
# Every render runs under these limits; render() takes its own time_limit and output_limit too.
RENDER_TIME_LIMIT_S = 2.0
# Output limit, in characters: max(MIN_OUTPUT_LIMIT, OUTPUT_LIMIT_PER_INPUT x the inputs' size as text), so a long
# conversation (a 128k-token context is about 500k characters) still renders and a tiny one cannot render gigabytes.
MIN_OUTPUT_LIMIT = 1 << 20
OUTPUT_LIMIT_PER_INPUT = 4
# Text produced in all, intermediate text (macro bodies, {% set %} blocks) included, relative to the output limit:
# it bounds the memory a render holds, as buffers inside macros fill before any output is counted.
WORK_LIMIT_PER_OUTPUT = 8
MAX_TEMPLATE_CHARS = 1 << 20  # real templates are under 50k characters
# One list built by `*` or `+` holds at most this many items: Jinja's own cap on one range(), so that a single C-level
# operation over a list (`in`, sort) stays short.
MAX_LIST_ITEMS = MAX_RANGE
_MAX_INT_BITS = 1 << 16  # ints past about 20,000 digits cannot even be printed (Python's int max str digits)


class _OverBudget(Exception):
    """Raised inside a render by a size check; render() turns it into a TemplateError naming the output limit."""


class _RenderTimeout(BaseException):
    """Raised in the rendering thread by the watchdog. A BaseException, so no `except Exception` inside Jinja or a
    filter swallows it."""


@dataclasses.dataclass
class _Budget:
    limit: int  # characters: the rendered text, and any one string or printed value
    work_limit: int  # characters produced in all, intermediate text included
    produced: int = 0

    def check(self, size: int, what: str) -> None:
        if size > self.limit:
            raise _OverBudget(f"{what} would be {size} characters or more")

    def check_items(self, count: int, what: str) -> None:
        if count > MAX_LIST_ITEMS:
            raise _OverBudget(f"{what} would hold {count} items (at most {MAX_LIST_ITEMS})")

    def produce(self, size: int) -> None:
        self.produced += size
        if self.produced > self.work_limit:
            raise _OverBudget(f"the template produced more than {self.work_limit} characters in all")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("tinylm_template_budget", default=None)


def _budget() -> _Budget:
    """The budget of the render in progress; outside render() (a template compiled and rendered directly, Jinja's
    constant folding at compile time) a fresh default one."""
    return _BUDGET.get() or _Budget(MIN_OUTPUT_LIMIT, MIN_OUTPUT_LIMIT * WORK_LIMIT_PER_OUTPUT)


def _text_size(value: Any, cap: int, indent: int = 0) -> int:
    """About how many characters str() or JSON of `value` takes (each element at `indent` per nesting level), counted
    until the count passes `cap`. Walks with iterators, not copies, so a list that repeats a huge list a million
    times costs `cap` steps at most, not a million times the inner list."""
    total = 0
    stack = [(iter((value,)), None, 0)]  # (iterator, id of its container, total when it was entered)
    sizes: dict[int, int] = {}  # a container met again (one list held twice, 60 levels deep) counts at once
    while stack:
        iterator, container, start = stack[-1]
        item = next(iterator, _END)
        if item is _END:
            stack.pop()
            if container is not None:
                sizes[container] = total - start
            continue
        total += 1 + indent * len(stack)
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() * 3 // 10 + 1
        elif id(item) in sizes:
            total += sizes[id(item)]
        elif (children := _children(item)) is not None:
            stack.append((children, id(item), total))
        else:
            total += 8  # None, bools, floats, Undefined, loop objects: short reprs
        if total > cap:
            break
    return total


def _children(item: Any):
    """An iterator over what a container prints, or None for anything else."""
    if isinstance(item, Mapping):
        return itertools.chain.from_iterable(item.items())
    if isinstance(item, (list, tuple, set, frozenset)):
        return iter(item)
    if isinstance(item, jinja2.utils.Namespace):
        return itertools.chain.from_iterable(object.__getattribute__(item, "_Namespace__attrs").items())
    return None


_END = object()


# --- size checks on the operations that can allocate far more than they are given

def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """`*`, `**`, `+` and `%` in a template, checked before Python allocates their result."""
    if operator == "*":
        _check_repeat(budget, left, right)
        _check_repeat(budget, right, left)
        if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise _OverBudget(f"an integer product of {left.bit_length() + right.bit_length()} bits")
    elif operator == "**":
        if _is_int(left) and _is_int(right) and abs(left) > 1 and right * left.bit_length() > _MAX_INT_BITS:
            raise _OverBudget(f"an integer power of about {right * left.bit_length()} bits")
    elif operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            budget.check(len(left) + len(right), "a string '+'")
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            budget.check_items(len(left) + len(right), "a list '+'")
    elif operator == "%" and isinstance(left, str):
        _check_printf(budget, left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_repeat(budget: _Budget, sequence: Any, times: Any) -> None:
    if not _is_int(times) or times <= 0:
        return
    if isinstance(sequence, (str, bytes)):
        budget.check(len(sequence) * times, f"a string repeated {times} times")
    elif isinstance(sequence, (list, tuple)):
        budget.check_items(len(sequence) * times, f"a list repeated {times} times")
        # its text: a list of one huge string repeated is small as a list, huge when printed or joined
        budget.check(_text_size(sequence, budget.limit // times + 1) * times, f"a list repeated {times} times")


# A printf spec's width and precision ("%-10.3f", "%*d"): digits, or "*" taken from the arguments
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """`fmt % args` and `fmt|format(...)`: every width in the format and every argument's text must fit."""
    for width, precision in _PRINTF_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                raise _OverBudget("a '*' width in a %-format")
            if number:
                budget.check(_number(number), f"a %-format width of {number[:12]}")
    budget.check(len(fmt) + _text_size(args, budget.limit), "a %-format")


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 12 else 10 ** 12  # int() of a million digits is itself slow


def _check_format_method(budget: _Budget, fmt: str, args: tuple, kwargs: dict) -> None:
    """str.format / str.format_map: no nested `{}` in a spec (its width comes from an argument), no huge width."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # a malformed format: the call itself raises
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise _OverBudget("a str.format spec with a nested field")
        for number in re.findall(r"\d+", spec or ""):
            budget.check(_number(number), f"a str.format width of {number[:12]}")
    budget.check(len(fmt) + _text_size((args, kwargs), budget.limit), "a str.format")


def _check_join(budget: _Budget, separator: str, items: list) -> None:
    size = len(separator) * max(len(items) - 1, 0)
    budget.check(size + _text_size(items, budget.limit), "a join")


def _check_replace(budget: _Budget, text: str, old: str, new: str, count: int = -1) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    occurrences = text.count(old) if old else len(text) + 1
    if _is_int(count) and count >= 0:
        occurrences = min(occurrences, count)
    budget.check(len(text) + occurrences * (len(new) - len(old)), "a replace")


_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}


def _check_str_method(budget: _Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """A call to a str method from a template; returns the arguments to call it with (a join's iterable as a list,
    so it can be measured first)."""
    text, name = method.__self__, method.__name__
    numbers = [a for a in (*args, *kwargs.values()) if _is_int(a)]
    if name in _WIDTH_METHODS:
        for number in numbers:
            budget.check(number, f"str.{name}({number})")
    elif name == "expandtabs":
        for number in numbers:
            budget.check(len(text) + text.count("\t") * number, f"str.expandtabs({number})")
    elif name in ("format", "format_map"):
        _check_format_method(budget, text, args, kwargs)
    elif name == "join" and len(args) == 1:
        args = (list(args[0]),)
        _check_join(budget, text, args[0])
    elif name == "replace":
        _check_replace(budget, text, *args, **kwargs)
    return args


# --- the same checks on Jinja's filters and globals. Filters get (value, *arguments); those that print a non-string
# value (str() of a list of lists can be exponentially larger than the list) measure it first.

def _check_printed(budget: _Budget, value: Any, *_args, **_kwargs) -> None:
    if not isinstance(value, str):
        budget.check(_text_size(value, budget.limit), "a printed value")


def _check_center_filter(budget: _Budget, value: Any, width: Any = 80, *_args, **_kwargs) -> None:
    _check_printed(budget, value)
    if _is_int(width):
        budget.check(width, f"center({width})")


def _check_indent_filter(budget: _Budget, value: Any, width: Any = 4, *_args, **_kwargs) -> None:
    _check_printed(budget, value)
    lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
    per_line = width if _is_int(width) else len(width) if isinstance(width, str) else 0
    budget.check(_text_size(value, budget.limit) + lines * per_line, f"indent({per_line})")


def _check_format_filter(budget: _Budget, value: Any, *args, **kwargs) -> None:
    _check_printed(budget, value)
    _check_printf(budget, str(value), kwargs or args)


def _check_join_filter(budget: _Budget, value: Any, separator: Any = "", *_args, **_kwargs) -> None:
    _check_join(budget, str(separator), value)


def _check_replace_filter(budget: _Budget, value: Any, old: Any = "", new: Any = "", count: Any = None,
                          *_args, **_kwargs) -> None:
    _check_printed(budget, value)
    _check_replace(budget, str(value), str(old), str(new), -1 if count is None else count)


def _check_wordwrap_filter(budget: _Budget, value: Any, width: Any = 79, break_long_words: Any = True,
                           wrapstring: Any = None, *_args, **_kwargs) -> None:
    _check_printed(budget, value)
    if isinstance(wrapstring, str) and isinstance(value, str):  # one wrapstring per line, a line per character at worst
        budget.check(len(value) * (len(wrapstring) + 1), "wordwrap")


def _check_count_filter(budget: _Budget, value: Any, count: Any = 1, *_args, **_kwargs) -> None:
    """batch(linecount) and slice(slices): each builds `count` items or lists."""
    if _is_int(count):
        budget.check_items(count, "batch/slice")


def _check_sum_filter(budget: _Budget, value: Any, attribute: Any = None, start: Any = 0, *_args, **_kwargs) -> None:
    """sum(start=[]) concatenates lists."""
    if isinstance(start, (list, tuple, str)):
        sizes = [len(item) for item in value if isinstance(item, (list, tuple, str))]
        budget.check_items(len(start) + sum(sizes), "sum")


def _check_tojson_filter(budget: _Budget, value: Any, ensure_ascii: Any = False, indent: Any = None,
                         *_args, **_kwargs) -> None:
    per_level = indent if _is_int(indent) else len(indent) if isinstance(indent, str) else 0
    budget.check(_text_size(value, budget.limit, per_level), "tojson")


# Filters whose value is materialized first (a generator from map/select), so the check and the filter see it all
_MATERIALIZED_FILTERS = {"join", "sum", "batch", "slice"}
_FILTER_CHECKS = {
    "center": _check_center_filter, "indent": _check_indent_filter, "format": _check_format_filter,
    "join": _check_join_filter, "replace": _check_replace_filter, "wordwrap": _check_wordwrap_filter,
    "batch": _check_count_filter, "slice": _check_count_filter, "sum": _check_sum_filter,
    "tojson": _check_tojson_filter, "pprint": _check_printed, "string": _check_printed, "e": _check_printed,
    "escape": _check_printed, "forceescape": _check_printed, "safe": _check_printed,
    "capitalize": _check_printed, "lower": _check_printed, "upper": _check_printed, "title": _check_printed,
    "trim": _check_printed, "striptags": _check_printed, "urlize": _check_printed, "wordcount": _check_printed,
    "truncate": _check_printed, "urlencode": _check_printed, "xmlattr": _check_printed,
}


def _checked_filter(name: str, filter_function):
    check = _FILTER_CHECKS[name]
    takes_state = hasattr(filter_function, "jinja_pass_arg")  # Jinja passes its context/environment first

    @functools.wraps(filter_function)  # keeps jinja_pass_arg, so Jinja still passes that first argument
    def checked(*args, **kwargs):
        lead = 1 if takes_state else 0
        if name in _MATERIALIZED_FILTERS and len(args) > lead and not isinstance(args[lead], (str, Mapping)):
            args = (*args[:lead], list(args[lead]), *args[lead + 1:])
        check(_budget(), *args[lead:], **kwargs)
        return filter_function(*args, **kwargs)

    return checked


def _checked_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - Jinja's parameter names
    if _is_int(n) and _is_int(max):
        _budget().check(n * max * 12, f"lipsum({n}, max={max})")  # words of up to about 12 characters
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


# --- compiled code that counts what it produces

class _OutputBuffer(list):
    """The list a macro, `{% set %}` block, filter block or call block collects its output in: each piece counts
    against the render's work limit as it is added (one extra per piece, for the reference)."""

    __slots__ = ("_budget",)

    def __init__(self, budget: _Budget):
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


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus the size checks: `*`, `**`, `+`, `%` and str method calls are checked before they run."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def call_binop(self, context, operator, left, right):
        _check_binop(_budget(), operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in a function of its own
        if isinstance(getattr(method, "__self__", None), str):
            args = _check_str_method(_budget(), method, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def output_buffer(self) -> _OutputBuffer:
        return _OutputBuffer(_budget())

    def checked_parts(self, parts: tuple) -> tuple:
        budget = _budget()
        budget.check(sum(len(p) if isinstance(p, str) else _text_size(p, budget.limit) for p in parts), "a '~'")
        return parts


def _finalize(value: Any) -> Any:
    """Every `{{ value }}` passes here before str(): a non-string is measured first (see _check_printed)."""
    if not isinstance(value, str):
        _check_printed(_budget(), value)
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


def _within_time_limit(seconds: float, work):
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


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself (its attributes lead to Python internals)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could shadow internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON, as transformers gives them
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    if re.search(r"%[-_0^#]*\d{4,}", format):  # glibc pads to any width: "%1000000000Y" is a gigabyte
        raise _OverBudget("a strftime width of 1000 or more")
    return datetime.now().strftime(format)


def _environment() -> _BudgetedEnvironment:
    env = _BudgetedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    for name in _FILTER_CHECKS:
        env.filters[name] = _checked_filter(name, env.filters[name])
    env.finalize = _finalize
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace, lipsum=_checked_lipsum)
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    if not _JINJA_IS_SAFE:
        raise TemplateError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox escapes), "
                            f"this is {jinja2.__version__}")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(_one_line(f"chat template has a syntax error at line {e.lineno}: {e.message}")) from None


def plain_data(value: Any) -> Any:
    """Rebuild `value` out of JSON types; anything else becomes an inert "<TypeName>" string.

    Caller objects (enums, pydantic models, arrays) carry methods the sandbox does not know are dangerous.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)  # str.__str__, not str(): str(enum) is its name
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


# Roles every template may see; a template's own string literals ('developer', 'ipython') add to them
STANDARD_ROLES = frozenset({"system", "user", "assistant", "tool"})
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@lru_cache(maxsize=32)
def template_roles(source: str) -> frozenset[str]:
    """The roles a message may have with this template: STANDARD_ROLES, plus every string literal in the template
    that could be a role name (a plain identifier), e.g. 'developer', 'ipython' or 'function'."""
    literals = {node.value for node in _ENV.parse(source).find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return STANDARD_ROLES | {name for name in literals if _ROLE_NAME.fullmatch(name)}


def _prepare_messages(messages: list, roles: frozenset[str]) -> list[dict]:
    """Drop None values (OpenAI clients send `content=None`), rebuild as plain data, alias reasoning fields; refuse
    roles the template does not know (a role is written into the prompt as is: "user\n<|im_start|>system" would
    open a turn of its own)."""
    chat = []
    for index, message in enumerate(plain_data(messages)):
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        _check_role(index, message.get("role"), roles)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:  # gpt-oss templates read `thinking`, the rest `reasoning_content`
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _check_role(index: int, role: Any, roles: frozenset[str]) -> None:
    if role is None:
        raise TemplateError(f"message {index} has no role")
    if not isinstance(role, str):
        raise TemplateError(f"message {index} has a role of type {type(role).__name__}; roles are strings")
    if not _ROLE_NAME.fullmatch(role):
        raise TemplateError(f"message {index} has the role {role[:40]!r}; a role is a plain name such as 'user'")
    if role not in roles:
        raise TemplateError(f"message {index} has the role {role!r}, which this chat template does not use "
                            f"(it knows {', '.join(sorted(roles))})")


def render(source: str, messages: list, *, tools: list | None = None, documents: list | None = None,
           add_generation_prompt: bool = False, continue_final_message: bool = False,
           time_limit: float = RENDER_TIME_LIMIT_S, output_limit: int | None = None, **variables) -> str:
    """Render `messages` with the template `source`. Every failure becomes a one-line TemplateError, and so does a
    render that runs past `time_limit` seconds or writes more than `output_limit` characters (default:
    max(MIN_OUTPUT_LIMIT, OUTPUT_LIMIT_PER_INPUT x the size of messages, tools, documents and variables as text)).
    Safe to call from any thread, the main one included."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"chat template is {len(source)} characters long, more than {MAX_TEMPLATE_CHARS}")
    if continue_final_message and add_generation_prompt:
        raise TemplateError("continue_final_message and add_generation_prompt cannot be used together")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise TemplateError("tools must be JSON-schema dicts")

    def work() -> str:
        template, roles = compile_template(source), template_roles(source)
        try:
            chat = _prepare_messages(messages, roles)
            inputs = dict(tools=plain_data(tools), documents=plain_data(documents), **plain_data(variables))
        except RecursionError:
            raise TemplateError("chat messages are nested too deeply") from None
        if continue_final_message:
            _tag_final_message(chat)
        limit = output_limit or max(MIN_OUTPUT_LIMIT, OUTPUT_LIMIT_PER_INPUT * _text_size((chat, inputs), 1 << 62))
        text = _render_within(template, _Budget(limit, limit * WORK_LIMIT_PER_OUTPUT),
                              dict(messages=chat, add_generation_prompt=add_generation_prompt, **inputs))
        return _cut_at_tag(text) if continue_final_message else text

    return _within_time_limit(time_limit, work)


def _render_within(template: jinja2.Template, budget: _Budget, context: dict) -> str:
    """The rendered text, counted as it is produced: it stops at the budget's limit, not after building it all."""
    parts, chunks, size = [], [], 0
    token = _BUDGET.set(budget)
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            budget.check(size, "the rendered text")
            budget.produce(len(chunk) + 1)
            chunks.append(chunk)
            if len(chunks) == 4096:  # a million one-character chunks would take 50 MB as separate objects
                parts.append("".join(chunks))
                chunks.clear()
    except _OverBudget as e:
        raise TemplateError(f"chat template exceeded its output limit of {budget.limit} characters: {e}") from None
    except SecurityError as e:
        raise TemplateError(_one_line(f"chat template sandbox violation: {e}")) from None
    except jinja2.TemplateError as e:  # raise_exception(...) and undefined values
        raise TemplateError(_one_line(f"chat template failed: {e}")) from None
    except Exception as e:  # any Python error inside the template (a bad comparison, a missing key)
        raise TemplateError(_one_line(f"chat template failed to render: {type(e).__name__}: {e}")) from None
    finally:
        _BUDGET.reset(token)
    return "".join(parts) + "".join(chunks)


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


def _tag_final_message(chat: list[dict]) -> None:
    """Mark the end of the last message's content so the rendered text can be cut there (to prefill a reply)."""
    content = chat[-1].get("content") if chat else None
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return
    blocks = [b for b in content or () if isinstance(b, dict) and "text" in b]
    if not blocks:
        raise TemplateError("continue_final_message needs a final message with text content")
    blocks[-1]["text"] += _CONTINUE_TAG


def _cut_at_tag(text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in text:
        raise TemplateError("continue_final_message: the template dropped the final message's content")
    at = text.rindex(tag)
    # A template that strips the content also strips the space we added after the tag, and the message's own
    # trailing space: cut that too (transformers does the same)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
