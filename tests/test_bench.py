"""`tinylm bench`: one JSON result per system and batch size with sane figures, and one-line errors."""

from __future__ import annotations

import json

import pytest

from tinylm.cli import main
from tinylm.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny("llama", tmp_path_factory.mktemp("bench") / "llama", seed=1))


def test_results_for_each_system_and_batch(capsys, tiny):
    code = main(["bench", "--model", tiny, "--batch", "1", "3", "--prompt-tokens", "12", "--new-tokens", "6",
                 "--repeats", "1", "--compare", "transformers", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert [(r["system"], r["batch"]) for r in results] == [("tinylm", 1), ("tinylm", 3), ("transformers", 1),
                                                            ("transformers", 3)]
    for r in results:
        assert r["ttft_ms"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert r["end_to_end_tok_s"] <= r["batch"] * 6 / (r["ttft_ms"] / 1e3)  # the whole run outlasts prefill
        assert r["peak_rss_gib"] is None or r["peak_rss_gib"] > 0


def test_table_with_a_draft(capsys, tiny):
    code = main(["bench", "--model", tiny, "--draft-model", "[ngram]", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].startswith("| system | batch") and lines[2].startswith("| tinylm | 1 |")


@pytest.mark.parametrize("argv,words", [(["--batch", "0"], "--batch"), (["--new-tokens", "0"], "--new-tokens"),
                                        (["--prompt-tokens", "600"], "context")])
def test_bad_arguments_are_one_line(capsys, tiny, argv, words):
    code = main(["bench", "--model", tiny, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("tinylm: error:") and words in err[0]
