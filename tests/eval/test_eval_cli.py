"""`tinylm eval`: results JSON and CSV, comparison table and plot, checkpoint series, resume after an interruption,
--quantize passed to the loader, perplexity, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tinylm
from tests.helpers import assert_one_line_error, run_cli
from tinylm.eval.checkpoints import checkpoint_info
from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.results import read_summary
from tinylm.tiny import make_tiny

DATA = str(Path(__file__).parents[1] / "data" / "eval")
TASKS = "hellaswag,arc_challenge,winogrande,mmlu"


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> str:
    return str(tiny_folder("llama", seed=4, name="tiny-llama"))


def test_two_dtypes_give_json_csv_table_and_plot(capsys, tiny, tmp_path):
    png = tmp_path / "compare.png"
    code, out, _ = run_cli(capsys, "eval", "tasks", tiny, "--tasks", TASKS, "--data-dir", DATA, "--output",
                           str(tmp_path), "--dtype", "float32,bfloat16", "--num-fewshot", "1", "--compare", "--plot",
                           str(png), "--no-progress")
    assert code == 0
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("results_*.json"))]
    assert {r["dtype"] for r in runs} == {"float32", "bfloat16"}
    for r in runs:
        assert r["settings"]["num_fewshot"] == 1 and r["model"] == "tiny-llama"
        assert set(r["results"]) == set(TASKS.split(","))
        assert r["results"]["hellaswag"]["n"] == 4 and "acc_norm_stderr" in r["results"]["hellaswag"]
        assert set(r["results"]["mmlu"]["groups"]) == {"astronomy", "elementary_mathematics"}
    rows = read_summary(tmp_path / "summary.csv")
    assert [(r["model"], r["dtype"], r["quantize"]) for r in rows] == [("tiny-llama", "float32", "none"),
                                                                        ("tiny-llama", "bfloat16", "none")]
    fp32 = next(r for r in runs if r["dtype"] == "float32")["results"]
    assert rows[0]["hellaswag"] == pytest.approx(fp32["hellaswag"]["acc_norm"])  # primary metric: acc_norm
    assert rows[0]["winogrande"] == pytest.approx(fp32["winogrande"]["acc"])
    assert "| `tiny-llama` | float32 | none |" in out and "| `tiny-llama` | bfloat16 | none |" in out
    assert "arc:challenge" in out.splitlines()[-4] or "arc:challenge" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_resumes_from_the_cache(capsys, tiny, tmp_path, monkeypatch):
    args = ["tasks", tiny, "--tasks", "hellaswag,mmlu", "--data-dir", DATA, "--dtype", "float32", "--no-progress",
            "--batch-size", "2"]
    code, out, _ = run_cli(capsys, "eval", *args, "--output", str(tmp_path / "fresh"), "--no-cache")
    fresh = json.loads(next((tmp_path / "fresh").glob("results_*.json")).read_text())["results"]

    original = Scorer.score
    scored: list[int] = []

    def interrupted(self, pairs, batch_size):
        for n, batch in enumerate(original(self, pairs, batch_size)):
            if n == 1:  # the second batch of 2 examples: the first 2 are cached, the rest not
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(Scorer, "score", interrupted)
    assert run_cli(capsys, "eval", *args, "--output", str(tmp_path / "out"))[0] == 130
    cached = sum(len(p.read_text().splitlines()) for p in (tmp_path / "out" / "cache").rglob("*.jsonl"))
    assert 0 < cached < 8

    def counting(self, pairs, batch_size):
        scored.append(len(pairs))
        yield from original(self, pairs, batch_size)

    monkeypatch.setattr(Scorer, "score", counting)
    assert run_cli(capsys, "eval", *args, "--output", str(tmp_path / "out"))[0] == 0
    resumed = json.loads(next((tmp_path / "out").glob("results_*.json")).read_text())
    assert sum(scored) < 4 * 4 + 4 * 4  # only the examples the interrupted run did not finish
    for task in ("hellaswag", "mmlu"):
        assert resumed["results"][task]["acc"] == fresh[task]["acc"]
        assert resumed["results"][task]["acc_norm"] == fresh[task]["acc_norm"]
    assert sum(resumed["results"][t]["timing"]["cached"] for t in ("hellaswag", "mmlu")) == cached


def test_checkpoint_series_plot_against_training_tokens(capsys, tmp_path):
    run_dir = tmp_path / "run"
    make_tiny("llama", run_dir / "tokens-1M", seed=1)
    make_tiny("llama", run_dir / "step-2", seed=2)
    (run_dir / "step-2" / "tinylm_checkpoint.json").write_text(json.dumps({"tokens": 2_500_000}))
    make_tiny("llama", run_dir / "checkpoint-3", seed=3)
    make_tiny("llama", run_dir / ".tmp-checkpoint-0000004-99", seed=4)  # a checkpoint still being written: skipped
    png = tmp_path / "series.png"
    code, out, _ = run_cli(capsys, "eval", "tasks", str(run_dir), "--series", "--tokens-per-step", "1000000",
                           "--tasks", "arc_easy,winogrande", "--data-dir", DATA, "--output", str(tmp_path / "o"),
                           "--dtype", "float32", "--plot", str(png), "--no-progress")
    assert code == 0
    rows = read_summary(tmp_path / "o" / "summary.csv")
    assert [(r["model"], r["tokens"]) for r in rows] == [("tokens-1M", 1_000_000), ("step-2", 2_500_000),
                                                          ("checkpoint-3", 3_000_000)]
    assert "| tokens |" in out and png.read_bytes()[:4] == b"\x89PNG"


def test_training_tokens_conventions(tmp_path):
    assert checkpoint_info(tmp_path / "TinyLlama-1.1B-intermediate-step-480k-1T").tokens == 10 ** 12
    assert checkpoint_info(tmp_path / "TinyLlama-1.1B-intermediate-step-480k-1T").step == 480_000
    assert checkpoint_info(tmp_path / "TinyLlama-1.1B").tokens is None
    assert checkpoint_info(tmp_path / "run_tokens_2.5B").tokens == 2_500_000_000
    assert checkpoint_info(tmp_path / "checkpoint-500", tokens_per_step=4096).tokens == 500 * 4096
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 9, "num_input_tokens_seen": 12345}))
    assert checkpoint_info(folder, tokens_per_step=10).tokens == 12345
    tinylm_run = tmp_path / "checkpoint-0000040"  # what `tinylm train` writes
    (tinylm_run / "trainer").mkdir(parents=True)
    (tinylm_run / "trainer" / "state.json").write_text(json.dumps({"step": 40, "tokens": 40 * 8 * 512}))
    assert (checkpoint_info(tinylm_run).tokens, checkpoint_info(tinylm_run).step) == (163840, 40)


def test_quantize_and_dtype_reach_the_loader(capsys, tiny, tmp_path, monkeypatch):
    seen = []
    original = tinylm.load

    def spy(model, dtype="float32", device="cpu", quantize=None):
        seen.append((dtype, quantize))
        return original(model, dtype=dtype, device=device)  # loads unquantized whatever quantization can do today

    monkeypatch.setattr(tinylm, "load", spy)
    code, _, _ = run_cli(capsys, "eval", "tasks", tiny, "--tasks", "arc_easy", "--data-dir", DATA, "--output",
                         str(tmp_path), "--dtype", "bfloat16", "--quantize", "none,int4", "--no-progress")
    assert code == 0 and seen == [("bfloat16", None), ("bfloat16", "int4")]
    assert [r["quantize"] for r in read_summary(tmp_path / "summary.csv")] == ["none", "int4"]


def test_perplexity_command(capsys, tiny, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"body": "Once upon a time there was a little robot. " * 8}) + "\n")
    code, out, _ = run_cli(capsys, "eval", "perplexity", tiny, "--data", str(data), "--field", "body", "--context",
                           "32", "--stride", "16", "--dtype", "float32", "--output", str(tmp_path / "ppl.json"),
                           "--no-progress")
    assert code == 0 and "perplexity" in out and "bits/byte" in out and "tokens/s" in out
    record = json.loads((tmp_path / "ppl.json").read_text())
    assert record["context"] == 32 and record["stride"] == 16 and record["perplexity"] > 1


@pytest.mark.parametrize("argv, words", [
    (["tasks", "{tiny}", "--tasks", "hellaswag,nope", "--data-dir", DATA], ["unknown task 'nope'"]),
    (["tasks", "{tiny}", "--tasks", "arc_easy", "--data-dir", "{tmp}"], ["arc_easy", "ARC-Easy/test.parquet"]),
    (["tasks", "{tiny}", "--tasks", "mmlu", "--data-dir", "{bad}"], ["test.jsonl", "row 1", "missing field 'choices'"]),
    (["tasks", "{tiny}", "--tasks", "arc_easy", "--data-dir", DATA, "--context", "100000"], ["--context 100000"]),
    (["perplexity", "{tiny}", "--data", "{tmp}/none.txt"], ["none.txt", "no such file"]),
])
def test_bad_input_is_one_line(capsys, tiny, tmp_path, argv, words):
    bad = tmp_path / "bad"
    (bad / "mmlu").mkdir(parents=True)
    (bad / "mmlu" / "test.jsonl").write_text('{"question": "q", "subject": "s", "answer": 0}\n')
    argv = [a.format(tiny=tiny, tmp=tmp_path, bad=bad) for a in argv]
    extra = ["--output", str(tmp_path / "out")] if argv[0] == "tasks" else []
    code, _, err = run_cli(capsys, "eval", *argv, *extra, "--no-progress")
    assert_one_line_error(code, err, *words)
