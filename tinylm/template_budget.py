"""The budget of a chat-template render: an output limit, a limit on all text produced, and size checks on every
operation that could allocate far more than the output limit in one step (`'a' * 10**9`, `2 ** 10**9`, a filter or
str method with a huge width). The environment that applies them, and the time limit, are tinylm/template_guard.py;
tinylm/chat_template.py renders under both with a `Budget` set in `BUDGET`. An overrun raises OverBudget, which
render() turns into a one-line TemplateError.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import re
import string
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import MAX_RANGE


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


class OverBudget(Exception):
    """Raised inside a render by a size check; render() turns it into a TemplateError naming the output limit."""




@dataclasses.dataclass
class Budget:
    limit: int  # characters: the rendered text, and any one string or printed value
    work_limit: int  # characters produced in all, intermediate text included
    produced: int = 0

    def check(self, size: int, what: str) -> None:
        if size > self.limit:
            raise OverBudget(f"{what} would be {size} characters or more")

    def check_items(self, count: int, what: str) -> None:
        if count > MAX_LIST_ITEMS:
            raise OverBudget(f"{what} would hold {count} items (at most {MAX_LIST_ITEMS})")

    def produce(self, size: int) -> None:
        self.produced += size
        if self.produced > self.work_limit:
            raise OverBudget(f"the template produced more than {self.work_limit} characters in all")


BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("tinylm_template_budget", default=None)


def current_budget() -> Budget:
    """The budget of the render in progress; outside render() (a template compiled and rendered directly, Jinja's
    constant folding at compile time) a fresh default one."""
    return BUDGET.get() or Budget(MIN_OUTPUT_LIMIT, MIN_OUTPUT_LIMIT * WORK_LIMIT_PER_OUTPUT)


def text_size(value: Any, cap: int, indent: int = 0) -> int:
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

def check_binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    """`*`, `**`, `+` and `%` in a template, checked before Python allocates their result."""
    if operator == "*":
        _check_repeat(budget, left, right)
        _check_repeat(budget, right, left)
        if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise OverBudget(f"an integer product of {left.bit_length() + right.bit_length()} bits")
    elif operator == "**":
        if _is_int(left) and _is_int(right) and abs(left) > 1 and right * left.bit_length() > _MAX_INT_BITS:
            raise OverBudget(f"an integer power of about {right * left.bit_length()} bits")
    elif operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            budget.check(len(left) + len(right), "a string '+'")
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            budget.check_items(len(left) + len(right), "a list '+'")
    elif operator == "%" and isinstance(left, str):
        _check_printf(budget, left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_repeat(budget: Budget, sequence: Any, times: Any) -> None:
    if not _is_int(times) or times <= 0:
        return
    if isinstance(sequence, (str, bytes)):
        budget.check(len(sequence) * times, f"a string repeated {times} times")
    elif isinstance(sequence, (list, tuple)):
        budget.check_items(len(sequence) * times, f"a list repeated {times} times")
        # its text: a list of one huge string repeated is small as a list, huge when printed or joined
        budget.check(text_size(sequence, budget.limit // times + 1) * times, f"a list repeated {times} times")


# A printf spec's width and precision ("%-10.3f", "%*d"): digits, or "*" taken from the arguments
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(budget: Budget, fmt: str, args: Any) -> None:
    """`fmt % args` and `fmt|format(...)`: every width in the format and every argument's text must fit."""
    for width, precision in _PRINTF_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                raise OverBudget("a '*' width in a %-format")
            if number:
                budget.check(_number(number), f"a %-format width of {number[:12]}")
    budget.check(len(fmt) + text_size(args, budget.limit), "a %-format")


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 12 else 10 ** 12  # int() of a million digits is itself slow


def _check_format_method(budget: Budget, fmt: str, args: tuple, kwargs: dict) -> None:
    """str.format / str.format_map: no nested `{}` in a spec (its width comes from an argument), no huge width."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # a malformed format: the call itself raises
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise OverBudget("a str.format spec with a nested field")
        for number in re.findall(r"\d+", spec or ""):
            budget.check(_number(number), f"a str.format width of {number[:12]}")
    budget.check(len(fmt) + text_size((args, kwargs), budget.limit), "a str.format")


def _check_join(budget: Budget, separator: str, items: list) -> None:
    size = len(separator) * max(len(items) - 1, 0)
    budget.check(size + text_size(items, budget.limit), "a join")


def _check_replace(budget: Budget, text: str, old: str, new: str, count: int = -1) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    occurrences = text.count(old) if old else len(text) + 1
    if _is_int(count) and count >= 0:
        occurrences = min(occurrences, count)
    budget.check(len(text) + occurrences * (len(new) - len(old)), "a replace")


_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}


def check_str_method(budget: Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
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

def check_printed(budget: Budget, value: Any, *_args, **_kwargs) -> None:
    if not isinstance(value, str):
        budget.check(text_size(value, budget.limit), "a printed value")


def _check_center_filter(budget: Budget, value: Any, width: Any = 80, *_args, **_kwargs) -> None:
    check_printed(budget, value)
    if _is_int(width):
        budget.check(width, f"center({width})")


def _check_indent_filter(budget: Budget, value: Any, width: Any = 4, *_args, **_kwargs) -> None:
    check_printed(budget, value)
    lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
    per_line = width if _is_int(width) else len(width) if isinstance(width, str) else 0
    budget.check(text_size(value, budget.limit) + lines * per_line, f"indent({per_line})")


def _check_format_filter(budget: Budget, value: Any, *args, **kwargs) -> None:
    check_printed(budget, value)
    _check_printf(budget, str(value), kwargs or args)


def _check_join_filter(budget: Budget, value: Any, separator: Any = "", *_args, **_kwargs) -> None:
    _check_join(budget, str(separator), value)


def _check_replace_filter(budget: Budget, value: Any, old: Any = "", new: Any = "", count: Any = None,
                          *_args, **_kwargs) -> None:
    check_printed(budget, value)
    _check_replace(budget, str(value), str(old), str(new), -1 if count is None else count)


def _check_wordwrap_filter(budget: Budget, value: Any, width: Any = 79, break_long_words: Any = True,
                           wrapstring: Any = None, *_args, **_kwargs) -> None:
    check_printed(budget, value)
    if isinstance(wrapstring, str) and isinstance(value, str):  # one wrapstring per line, a line per character at worst
        budget.check(len(value) * (len(wrapstring) + 1), "wordwrap")


def _check_count_filter(budget: Budget, value: Any, count: Any = 1, *_args, **_kwargs) -> None:
    """batch(linecount) and slice(slices): each builds `count` items or lists."""
    if _is_int(count):
        budget.check_items(count, "batch/slice")


def _check_sum_filter(budget: Budget, value: Any, attribute: Any = None, start: Any = 0, *_args, **_kwargs) -> None:
    """sum(start=[]) concatenates lists."""
    if isinstance(start, (list, tuple, str)):
        sizes = [len(item) for item in value if isinstance(item, (list, tuple, str))]
        budget.check_items(len(start) + sum(sizes), "sum")


def _check_tojson_filter(budget: Budget, value: Any, ensure_ascii: Any = False, indent: Any = None,
                         *_args, **_kwargs) -> None:
    per_level = indent if _is_int(indent) else len(indent) if isinstance(indent, str) else 0
    budget.check(text_size(value, budget.limit, per_level), "tojson")


# Filters whose value is materialized first (a generator from map/select), so the check and the filter see it all
_MATERIALIZED_FILTERS = {"join", "sum", "batch", "slice"}
FILTER_CHECKS = {
    "center": _check_center_filter, "indent": _check_indent_filter, "format": _check_format_filter,
    "join": _check_join_filter, "replace": _check_replace_filter, "wordwrap": _check_wordwrap_filter,
    "batch": _check_count_filter, "slice": _check_count_filter, "sum": _check_sum_filter,
    "tojson": _check_tojson_filter, "pprint": check_printed, "string": check_printed, "e": check_printed,
    "escape": check_printed, "forceescape": check_printed, "safe": check_printed,
    "capitalize": check_printed, "lower": check_printed, "upper": check_printed, "title": check_printed,
    "trim": check_printed, "striptags": check_printed, "urlize": check_printed, "wordcount": check_printed,
    "truncate": check_printed, "urlencode": check_printed, "xmlattr": check_printed,
}


def checked_filter(name: str, filter_function):
    check = FILTER_CHECKS[name]
    takes_state = hasattr(filter_function, "jinja_pass_arg")  # Jinja passes its context/environment first

    @functools.wraps(filter_function)  # keeps jinja_pass_arg, so Jinja still passes that first argument
    def checked(*args, **kwargs):
        lead = 1 if takes_state else 0
        if name in _MATERIALIZED_FILTERS and len(args) > lead and not isinstance(args[lead], (str, Mapping)):
            args = (*args[:lead], list(args[lead]), *args[lead + 1:])
        check(current_budget(), *args[lead:], **kwargs)
        return filter_function(*args, **kwargs)

    return checked


def checked_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - Jinja's parameter names
    if _is_int(n) and _is_int(max):
        current_budget().check(n * max * 12, f"lipsum({n}, max={max})")  # words of up to about 12 characters
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)
