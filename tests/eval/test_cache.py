"""The resume cache: records survive a reopen, a line cut short by a crash is skipped and never glued to the next."""

from __future__ import annotations

from tinylm.eval.cache import ResultCache, requests_digest
from tinylm.eval.prompts import Request


def test_records_survive_reopen_and_settings_do_not_collide(tmp_path):
    path = tmp_path / "c" / "task.jsonl"
    zero, five = requests_digest([Request("Q", " A")]), requests_digest([Request("shots\n\nQ", " A")])
    cache = ResultCache(path)
    cache.put("", 0, zero, [-1.5, -2.0], [True, False])
    cache.put("", 0, five, [-0.5, -3.0], [True, False])
    cache.close()
    again = ResultCache(path)
    assert again.get("", 0, zero)["ll"] == [-1.5, -2.0]
    assert again.get("", 0, five)["ll"] == [-0.5, -3.0]
    assert again.get("", 1, zero) is None and again.get("x", 0, zero) is None


def test_a_torn_last_line_is_ignored_and_ended(tmp_path):
    path = tmp_path / "task.jsonl"
    cache = ResultCache(path)
    cache.put("", 0, "h0", [-1.0], [True])
    cache.close()
    with open(path, "a") as f:
        f.write('{"g": "", "i": 1, "h": "h1", "ll": [-2.')  # the process died mid-write
    cache = ResultCache(path)
    assert cache.get("", 1, "h1") is None and cache.get("", 0, "h0") is not None
    cache.put("", 2, "h2", [-3.0], [False])
    cache.close()
    reloaded = ResultCache(path)
    assert reloaded.get("", 2, "h2")["ll"] == [-3.0] and reloaded.get("", 0, "h0")["ll"] == [-1.0]
