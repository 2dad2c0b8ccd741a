"""`tinylm bench`: figures per system and batch size, ratios, paired rounds, the JSON document and its markdown
report, the named shapes, serving mode, and one-line errors and skips."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import sys
import types
from dataclasses import asdict
from datetime import datetime

import pytest
import torch

from tests.helpers import run_cli
from tinylm.bench import report
from tinylm.bench.shapes import SHAPES, build_shape, shape_config
from tinylm.cli import main
from tinylm.config import ModelConfig


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return str(tiny_folder("llama", 1))


def _bench(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, "bench", *argv)


@pytest.fixture(scope="module")
def compared(tiny):
    """One run against transformers at two batch sizes, as a JSON document (shared by the tests that read it)."""
    out = io.StringIO()  # capsys is per test: this module-wide run captures its own output
    with contextlib.redirect_stdout(out):
        code = main(["bench", "--model", tiny, "--batch", "1", "3", "--prompt-tokens", "12", "--new-tokens", "6",
                     "--repeats", "1", "--compare", "transformers", "--json"])
    return code, json.loads(out.getvalue())


def _check_figures(r: dict, new_tokens: int) -> None:
    assert r["ttft_ms"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert 0 < r["ttft_p50_ms"] <= r["ttft_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert r["end_to_end_tok_s"] <= r["batch"] * new_tokens / (r["ttft_ms"] / 1e3)  # the whole run outlasts prefill


def test_results_for_each_system_and_batch(compared):
    code, document = compared
    results = document["results"]
    assert code == 0
    assert [(r["system"], r["batch"]) for r in results] == [("tinylm", 1), ("tinylm", 3), ("transformers", 1),
                                                            ("transformers", 3)]
    for r in results:
        _check_figures(r, new_tokens=6)
        assert r["peak_rss_gib"] is None or r["peak_rss_gib"] > 0
    ours = {r["batch"]: r for r in results if r["system"] == "tinylm"}
    theirs = {r["batch"]: r for r in results if r["system"] == "transformers"}
    assert [(e["batch"], e["reference"]) for e in document["ratios"]] == [(1, "transformers"), (3, "transformers")]
    for entry in document["ratios"]:
        b = entry["batch"]
        assert entry["decode"] == pytest.approx(ours[b]["decode_tok_s"] / theirs[b]["decode_tok_s"])
        assert entry["end_to_end"] == pytest.approx(ours[b]["end_to_end_tok_s"] / theirs[b]["end_to_end_tok_s"])
        assert "rounds" not in entry  # no --pairs


def test_json_names_the_command_machine_isa_and_date(compared, tiny):
    _, document = compared
    assert document["command"] == (f"tinylm bench --model {tiny} --batch 1 3 --prompt-tokens 12 --new-tokens 6 "
                                   "--repeats 1 --compare transformers --json")
    machine = document["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] >= 1 and machine["memory_gib"] > 0
    assert document["isa"] == machine["isa"] == torch.backends.cpu.get_cpu_capability()
    assert datetime.fromisoformat(document["date"]).tzinfo is not None
    versions = document["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"]
    assert set(document["systems"]) == {"tinylm", "transformers"}
    assert document["systems"]["tinylm"]["label"].endswith("eager") and document["notes"] == []


def test_report_renders_the_json_as_markdown(compared, tmp_path, capsys):
    _, document = compared
    (tmp_path / "run.json").write_text(json.dumps(document))
    assert report.main([str(tmp_path / "run.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("### ") and "batch 1 3" in lines[0]
    figures = lines[lines.index(next(x for x in lines if x.startswith("| system | batch"))):]
    assert [row.split(" | ")[0:2] for row in figures[2:6]] == [["| tinylm", "1"], ["| tinylm", "3"],
                                                                ["| transformers", "1"], ["| transformers", "3"]]
    ratio_rows = [x for x in lines if x.startswith(("| 1 | transformers |", "| 3 | transformers |"))]
    assert len(ratio_rows) == 2 and all(x.count("x |") == 2 for x in ratio_rows)
    text = "\n".join(lines)
    assert f"`{document['command']}`" in text and f"ISA {document['isa']}" in text and document["date"] in text


def test_report_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    assert report.main([str(tmp_path / "bad.json")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_table_with_a_draft(capsys, tiny):
    code = main(["bench", "--model", tiny, "--draft-model", "[ngram]", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].startswith("| system | batch") and lines[2].startswith("| tinylm | 1 |")


def test_pairs_against_a_variant(capsys, tiny):
    """--pairs: every round times each system once; the ratios' rounds are tinylm / variant per round."""
    code, out, _ = _bench(capsys, "--model", tiny, "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                          "--pairs", "3", "--variant", "--kv-cache-dtype int8", "--json")
    document = json.loads(out)
    assert code == 0 and [r["system"] for r in document["results"]] == ["tinylm", "tinylm-variant"]
    assert all(r["peak_rss_gib"] is None for r in document["results"])  # both loaded at once
    assert document["systems"]["tinylm-variant"]["label"].endswith("int8 K/V cache")
    (entry,) = document["ratios"]
    rounds = {(r["system"], r["round"]): r for r in document["rounds"]}
    assert len(rounds) == 6
    expected = [rounds["tinylm", i]["decode_tok_s"] / rounds["tinylm-variant", i]["decode_tok_s"] for i in range(3)]
    assert entry["rounds"]["decode"] == pytest.approx(expected)
    assert entry["rounds"]["decode_lowest"] == pytest.approx(min(expected))
    assert entry["rounds"]["decode_median"] == pytest.approx(sorted(expected)[1])


def test_llama_cpp_missing_is_one_skipped_line(capsys, monkeypatch, tiny):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    code, out, err = _bench(capsys, "--model", tiny, "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1",
                            "--compare", "llama.cpp", "--json")
    document = json.loads(out)
    assert code == 0 and [r["system"] for r in document["results"]] == ["tinylm"]
    (line,) = err.strip().splitlines()
    assert "llama.cpp" in line and "not installed" in line and document["notes"] == [line.split(": ", 1)[1]]


class FakeLlama:
    """llama_cpp.Llama's surface that the bench uses: greedy generate() yields token ids and never stops."""

    opened: list[str] = []

    def __init__(self, model_path: str, n_ctx: int, n_threads: int, verbose: bool) -> None:
        FakeLlama.opened.append(model_path)
        self.fresh = False

    def reset(self) -> None:
        self.fresh = True

    def generate(self, tokens: list[int], top_k: int, temp: float):
        assert self.fresh and top_k == 1 and temp == 0.0 and tokens  # a new prompt each run, greedy
        self.fresh = False
        while True:
            yield 7

    def close(self) -> None:
        pass


def test_llama_cpp_on_the_gguf_and_a_bf16_copy(capsys, monkeypatch, tmp_path):
    """llama.cpp runs the GGUF as stored and a BF16 copy (written to --work-dir), batch 1 only; its library is
    faked here (llama-cpp-python compiles from source for ~10 minutes)."""
    from tests.weights.tiny_files import tiny_gguf

    module = types.ModuleType("llama_cpp")
    module.__spec__ = importlib.machinery.ModuleSpec("llama_cpp", None)
    module.Llama, module.__version__ = FakeLlama, "fake"
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setattr(FakeLlama, "opened", [])
    gguf = tiny_gguf(tmp_path / "tiny.Q8_0.gguf")
    code, out, err = _bench(capsys, "--model", str(gguf), "--work-dir", str(tmp_path), "--batch", "1", "2",
                            "--prompt-tokens", "4", "--new-tokens", "3", "--repeats", "1",
                            "--compare", "llama.cpp,llama.cpp:bf16", "--json")
    document = json.loads(out)
    assert code == 0 and FakeLlama.opened == [str(gguf), str(tmp_path / "tiny.Q8_0.bf16.gguf")]
    assert [(r["system"], r["batch"]) for r in document["results"]] == [
        ("tinylm", 1), ("tinylm", 2), ("llama.cpp", 1), ("llama.cpp:bf16", 1)]
    assert [(e["batch"], e["reference"]) for e in document["ratios"]] == [(1, "llama.cpp"), (1, "llama.cpp:bf16")]
    assert len(err.strip().splitlines()) == 2 and all("batch 2 skipped" in n for n in document["notes"])
    assert document["versions"]["llama_cpp"] == "fake"


def test_serve_mode_times_streaming_clients(capsys, tiny):
    """--clients: `tinylm serve` in a process of its own, clients in another, beside llm.stream in the bench."""
    code, out, _ = _bench(capsys, "--model", tiny, "--clients", "1", "3", "--prompt-tokens", "6",
                          "--new-tokens", "5", "--repeats", "1", "--json")
    document = json.loads(out)
    assert code == 0 and [(r["system"], r["batch"]) for r in document["results"]] == [
        ("tinylm", 1), ("tinylm", 3), ("tinylm-stream", 1), ("tinylm-stream", 3)]
    for r in document["results"]:
        _check_figures(r, new_tokens=5)
    assert "tinylm serve" in document["systems"]["tinylm"]["label"]
    assert [(e["batch"], e["reference"]) for e in document["ratios"]] == [(1, "tinylm-stream"), (3, "tinylm-stream")]
    assert any("share this host's CPU" in note for note in document["notes"])


def test_serve_mode_against_a_served_variant(capsys, tiny):
    code, out, _ = _bench(capsys, "--model", tiny, "--serve", "--prompt-tokens", "6", "--new-tokens", "3",
                          "--repeats", "1", "--pairs", "2", "--variant=--kv-cache-dtype=int8", "--json")
    document = json.loads(out)
    assert code == 0 and [r["system"] for r in document["results"]] == ["tinylm", "tinylm-stream", "tinylm-variant"]
    label = document["systems"]["tinylm-variant"]["label"]
    assert "int8 K/V cache" in label and "tinylm serve" in label
    assert len(document["ratios"][0]["rounds"]["end_to_end"]) == 2


def test_llama_server_on_a_folder_is_one_skipped_line(capsys, tiny):
    code, out, err = _bench(capsys, "--model", tiny, "--clients", "2", "--prompt-tokens", "4", "--new-tokens", "2",
                            "--repeats", "1", "--compare", "llama-server", "--json")
    document = json.loads(out)
    assert code == 0 and {r["system"] for r in document["results"]} == {"tinylm", "tinylm-stream"}
    assert [n for n in document["notes"] if n.startswith("llama-server: skipped")]


def test_smallest_shape_runs_against_transformers(capsys, tmp_path):
    """--shape qwen3-next (seed 002's hybrid, 2.3M parameters) end to end, the folder also loading in transformers;
    the written folder is reused by the next run."""
    code, out, _ = _bench(capsys, "--shape", "qwen3-next", "--work-dir", str(tmp_path), "--prompt-tokens", "4",
                          "--new-tokens", "2", "--repeats", "1", "--compare", "transformers", "--json")
    document = json.loads(out)
    assert code == 0 and [r["system"] for r in document["results"]] == ["tinylm", "transformers"]
    assert document["command"].startswith("tinylm bench --shape qwen3-next")
    manifest = (tmp_path / "qwen3-next" / "SHA256SUMS").stat().st_mtime_ns
    assert build_shape("qwen3-next", tmp_path) == tmp_path / "qwen3-next"
    assert (tmp_path / "qwen3-next" / "SHA256SUMS").stat().st_mtime_ns == manifest


def _dims(config: ModelConfig) -> dict:
    """A config's dimensions: token ids and the stored dtype left out, the GGUF's float32 epsilon rounded."""
    dims = {k: v for k, v in asdict(config).items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                   "torch_dtype")}
    return {**dims, "rms_norm_eps": round(dims["rms_norm_eps"], 9)}


def _intended(name: str, smollm2_gguf) -> ModelConfig:
    """Each shape's source: the built-in model's GGUF, seed 001's TinyLlama table, the Qwen3-Next parity tests'
    seed-002 model, and the MoE shape benchmarks/moe_decode.py built on tinylm.tiny's qwen3_moe family."""
    if name == "smollm2-135m":
        from tinylm.weights.gguf import read_gguf_config

        return read_gguf_config(smollm2_gguf)
    if name == "tinyllama-1.1b":
        return ModelConfig.from_hf_dict(dict(
            model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False))
    if name == "qwen3-next":
        from tests.model.test_parity import seed_002_config

        return ModelConfig.from_hf_dict(seed_002_config().to_dict())
    from tinylm import tiny

    return ModelConfig.from_hf_dict(dict(tiny.FAMILIES["qwen3_moe"], hidden_size=512, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=768))


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_have_their_models_dimensions(name, smollm2_gguf):
    assert _dims(shape_config(name)) == _dims(_intended(name, smollm2_gguf))


def test_shape_sizes():
    """Parameter counts the names promise (tied heads counted once)."""
    def parameters(name: str) -> float:
        with torch.device("meta"):
            from tinylm.model.transformer import CausalLM

            model = CausalLM(shape_config(name))
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6

    assert parameters("smollm2-135m") == pytest.approx(134.5, rel=0.01)
    assert parameters("tinyllama-1.1b") == pytest.approx(1100, rel=0.01)
    assert parameters("moe") == pytest.approx(81.3, rel=0.01) and parameters("qwen3-next") < 3


@pytest.mark.parametrize("argv,words", [
    (["--batch", "0"], "--batch"), (["--new-tokens", "0"], "--new-tokens"), (["--new-tokens", "1"], "at least 2"),
    (["--prompt-tokens", "600"], "context"),
    (["--pairs", "-1"], "--pairs"), (["--compare", "transformers,vllm"], "'vllm'"),
    (["--shape", "moe"], "not both"), (["--variant=--no-such-flag"], "--variant"),
])
def test_bad_arguments_are_one_line(capsys, tiny, argv, words):
    code = main(["bench", "--model", tiny, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("tinylm: error:") and words in err[0]


def test_every_timed_run_computes_its_prompts(tiny):
    """Warm-up and earlier runs used the same prompts: a timed run must not be served from the prefix cache, or it
    would time a lookup and call it prefill (the references compute every prompt)."""
    import tinylm
    from tinylm.bench.systems import TinyLMSystem

    system = TinyLMSystem(tinylm.load(tiny, dtype="float32", compile=False))
    prompts = [[5 + i] * 40 for i in range(2)]  # 2 full 16-token blocks each: cacheable
    system.warm(prompts)
    blocks = system.llm.engine.blocks
    hits = blocks.hits
    system.run(prompts, 3)
    system.run(prompts, 3)
    assert blocks.hits == hits


def test_the_compile_gauge_is_read_from_the_prometheus_text():
    from tinylm.bench.serve import gauge_value

    text = ("# HELP tinylm:compile_in_progress 1 while a decode graph builds\n# TYPE tinylm:compile_in_progress gauge\n"
            "tinylm:compile_in_progress 1.0\n"
            '# TYPE tinylm:num_requests_running gauge\ntinylm:num_requests_running{model_name="m"} 3.0\n')
    assert gauge_value(text, "tinylm:compile_in_progress") == 1.0
    assert gauge_value(text.replace("progress 1.0", "progress 0.0"), "tinylm:compile_in_progress") == 0.0
    assert gauge_value(text, "tinylm:num_requests_running") is None  # labelled: not this question
    assert gauge_value("", "tinylm:compile_in_progress") is None
