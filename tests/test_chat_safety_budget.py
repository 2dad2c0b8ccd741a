"""Chat template rendering has a time and size budget (tinylm.chat_template.render): templates are untrusted code,
from model files and, when a server allows it, from requests. Every overrun is a one-line TemplateError, quickly,
with memory bounded; in the main thread and in worker threads alike."""

from __future__ import annotations

import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.tokenizer_helpers import SMOLLM2_TEMPLATE, USER_CHAT
from tinylm import chat_template
from tinylm.chat_template import render
from tinylm.errors import TemplateError
from tinylm.tokenizer import Tokenizer

NESTED_RANGES = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# 10 ** 20 iterations of loops over literal lists: no function call anywhere for a check inside call() to catch
LITERAL_LOOPS = ("".join("{%% for a%d in [0,1,2,3,4,5,6,7,8,9] %%}" % depth for depth in range(20))
                 + "{% endfor %}" * 20)
HUGE_STRING = "{{ 'a' * 10**9 }}"


def _fails_quickly(template: str, match: str, seconds: float = 3.5, **kwargs) -> TemplateError:
    started = time.monotonic()
    with pytest.raises(TemplateError, match=match) as err:
        render(template, USER_CHAT, **kwargs)
    assert time.monotonic() - started < seconds
    assert "\n" not in str(err.value)
    return err.value


@pytest.mark.parametrize("template", [NESTED_RANGES, LITERAL_LOOPS], ids=["nested-range", "literal-loops"])
def test_endless_loops_stop_at_the_time_budget(template):
    assert str(_fails_quickly(template, "time budget")) == "chat template exceeded its time budget of 2.0 s"


def test_the_time_budget_is_a_parameter():
    _fails_quickly(NESTED_RANGES, "time budget of 0.3 s", seconds=1.5, time_limit=0.3)


@pytest.mark.parametrize("template", [
    HUGE_STRING,
    "{{ '%s' % ('a' * 10**9) }}",
    "{{ 2 ** (10**9) }}",
    "{{ [1, 2] * 10**9 }}",
    "{{ 'a'.center(10**9) }}",
    "{{ 'a' | center(10**9) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ (['x' * 100000] * 100000) | join }}",
    "{{ ('a' * 100000).replace('a', 'bbbbbbbbbb' * 10000) }}",
    "{{ ('line\\n' * 1000) | indent(10**6) }}",
    "{{ lipsum(10**6) }}",
    "{{ strftime_now('%1000000000Y') }}",
    # doubling: 60 rounds would reach exabytes long before the time budget
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    # a list that holds itself twice, 60 times over: tiny as a list, 2**60 times longer as text
    "{% set ns = namespace(l=['x']) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ ns.l | tojson }}",
    "{% set ns = namespace(l=['x']) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    # text collected inside {% set %} blocks and macros, never output: counted as it is produced
    "{% set s = 'abcd' %}" + "{% set s %}{{ s }}{{ s }}{% endset %}" * 45,
    "{% macro page() %}{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endmacro %}"
    "{% for i in range(1000) %}{% set kept = page() %}{% endfor %}",
    # plain output past the limit
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i ~ 'x' * 1000 }}{% endfor %}{% endfor %}",
])
def test_huge_values_are_refused_before_they_are_built(template):
    tracemalloc.start()
    try:  # the output limit must trip, not the time budget: a host busy with other work (and tracemalloc's cost)
        # took the macro case past 2 s once, so the budget here is wide; refusing stays quick where it is the limit
        _fails_quickly(template, "output limit of 1048576 characters", seconds=30, time_limit=20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # the limit is about 1 M characters; nothing near the gigabytes asked for


def test_the_output_limit_grows_with_the_input():
    """max(MIN_OUTPUT_LIMIT, OUTPUT_LIMIT_PER_INPUT x the inputs' size): a long conversation still renders."""
    long_chat = [{"role": "user", "content": "word " * 400_000}]  # 2 M characters, over MIN_OUTPUT_LIMIT
    assert len(render(SMOLLM2_TEMPLATE, long_chat)) > 2_000_000
    with pytest.raises(TemplateError, match="output limit of 100 characters"):
        render(SMOLLM2_TEMPLATE, USER_CHAT, output_limit=100)


def test_huge_template_source_is_refused():
    with pytest.raises(TemplateError, match="characters long"):
        render("x" * (chat_template.MAX_TEMPLATE_CHARS + 1), USER_CHAT)


def test_budget_holds_in_worker_threads_and_normal_renders_go_on():
    """The server renders from a thread pool: a runaway template stops in its own thread, others are unaffected."""
    tokenizer_free = [(NESTED_RANGES, "time budget"), (HUGE_STRING, "output limit"), (SMOLLM2_TEMPLATE, None)] * 2

    def run(case):
        template, match = case
        try:
            return render(template, USER_CHAT, time_limit=1.0)
        except TemplateError as e:
            assert match and match in str(e)
            return match

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, tokenizer_free))
    assert time.monotonic() - started < 5
    assert results[2] == results[5] == render(SMOLLM2_TEMPLATE, USER_CHAT)
    assert results[0] == "time budget" and results[1] == "output limit"


def test_renders_finishing_at_their_deadline_leave_no_stray_timeout():
    """The race: the watchdog fires as the render ends. The pending exception is cleared, never raised later."""
    for i in range(500):
        try:
            render(SMOLLM2_TEMPLATE, USER_CHAT, time_limit=0.00002 * (i % 4))
        except TemplateError as e:
            assert "time budget" in str(e)
        sum(range(100))  # plain Python after the render: a stray timeout would be raised here


def test_tokenizer_renders_request_templates_through_the_budget(folders):
    tokenizer = Tokenizer.from_folder(folders["smollm2"])
    with pytest.raises(TemplateError, match="output limit"):
        tokenizer.apply_chat_template(USER_CHAT, chat_template=HUGE_STRING, tokenize=True)
    assert tokenizer.has_template("default") and not tokenizer.has_template(HUGE_STRING)
