"""Run configs: validated on load with one-line errors naming the bad key; saved beside every checkpoint; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tinylm.cli import main
from tinylm.tiny import build_tokenizer
from tinylm.train.config import TrainConfigError, config_from_dict, load_config
from tinylm.train.data import PackedDataset, SampleOrder, rank_slice
from tinylm.train.setup import lr_at
from tinylm.train.shards import DataError, TokenShards, build_shards, token_dtype

GOOD = {"mode": "pretrain", "model": {"family": "llama", "tokenizer": "tiny"}, "data": {"train": ["a.txt"]},
        "train": {"max_steps": 10}, "checkpoint": {"out_dir": "out"}}


def _with(**changes):
    data = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return data


@pytest.mark.parametrize("changes, message", [
    ({"optim__lrr": 1.0}, "unknown key optim.lrr"),
    ({"optim__lr": "fast"}, "optim.lr must be a number, got 'fast'"),
    ({"train__global_batch_size": 6, "train__micro_batch_size": 4}, "train.global_batch_size 6 is not a multiple"),
    ({"train__precision": "fp8"}, "train.precision must be auto, fp32 or bf16"),
    ({"train__max_steps": 0}, "train.max_steps must be positive"),
    ({"train__max_steps": True}, "train.max_steps must be an integer"),
    ({"lora__r": 0}, "lora.r"),
    ({"lora__rank": 4}, "unknown key lora.rank"),
    ({"data__train": []}, "data.train needs at least one file"),
    ({"checkpoint__out_dir": ""}, "checkpoint.out_dir is required"),
    ({"optim__schedule": "step"}, "optim.schedule must be cosine, linear or constant"),
])
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(TrainConfigError) as info:
        config_from_dict(_with(**changes))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mode_must_match_the_command():
    with pytest.raises(TrainConfigError, match="mode is 'pretrain' but the command is `train sft`"):
        config_from_dict(GOOD, mode="sft")
    with pytest.raises(TrainConfigError, match="dpo.reference"):
        config_from_dict({**GOOD, "mode": "dpo"})


def test_yaml_and_json_load_the_same_with_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "c.json").write_text(json.dumps(GOOD))
    a = load_config(tmp_path / "c.yaml", overrides=["optim.lr=1e-3", "train.max_tokens=2e6"])
    b = load_config(tmp_path / "c.json", overrides=["optim.lr=0.001", "train.max_tokens=2000000"])
    assert a == b and a.optim.lr == 1e-3 and a.train.max_tokens == 2_000_000


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(optim__warmup="x")))
    assert main(["train", "pretrain", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinylm: error: config: unknown key optim.warmup") and err.count("\n") == 1
    assert main(["train", "sft", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read config" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**GOOD, "data": {"train": [str(tmp_path / "nope.txt")]},
                                    "checkpoint": {"out_dir": str(tmp_path / "o")}}))
    assert main(["train", "pretrain", str(path)]) == 1
    assert "nope.txt does not exist" in capsys.readouterr().err


def test_schedule_warmup_then_cosine_to_min_lr():
    config = config_from_dict(_with(optim__lr=1.0, optim__min_lr=0.1, optim__warmup_steps=4))
    lrs = [lr_at(s, config.optim, 14) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_token_shards_dtype_boundaries_and_cache(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokenizer = build_tokenizer()
    files = []
    for i in range(3):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(f"Story {i}: the little robot read about the sea.\n" * (i + 1))
    folder = build_shards([str(f) for f in files], tokenizer, tmp_path / "cache", "text", 512, shard_tokens=7)
    stream = TokenShards(folder)
    expected = []
    for f in files:
        expected += tokenizer.encode(f.read_text(), add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(stream.shards) > 3 and stream.read(0, len(stream)).tolist() == expected  # spans 7-token shards
    assert stream.shards[0].dtype == np.uint16
    assert build_shards([str(f) for f in files], tokenizer, tmp_path / "cache", "text", 512, 7) == folder  # cached
    rows = PackedDataset(stream, seq_len=10)
    assert len(rows) == len(expected) // 10 and rows[3]["input_ids"].tolist() == expected[30:40]
    files[0].write_text("changed")
    assert build_shards([str(f) for f in files], tokenizer, tmp_path / "cache", "text", 512, 7) != folder


def test_large_txt_streams_in_chunks_as_one_document(tmp_path, monkeypatch):
    from tinylm.train import shards

    monkeypatch.setattr(shards, "_LINES_PER_CHUNK", 2)
    monkeypatch.setattr(shards, "_PIECES_PER_BATCH", 2)
    tokenizer = build_tokenizer()
    text = "".join(f"Line {i} of the story about the sea.\n" for i in range(7))
    (tmp_path / "big.txt").write_text(text)
    folder = build_shards([str(tmp_path / "big.txt")], tokenizer, tmp_path / "cache", "text", 512, 1000)
    tokens = TokenShards(folder).read(0, 10_000).tolist()
    assert tokens == tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert json.loads((folder / "meta.json").read_text())["documents"] == 1


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: no string field 'text'"):
        build_shards([str(path)], build_tokenizer(), tmp_path / "cache", "text", 512, 100)


def test_sample_order_is_a_pure_function_and_ranks_partition_the_batch():
    order = SampleOrder(10, seed=3)
    first = [order.index(k) for k in range(25)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # reshuffled each epoch
    assert [SampleOrder(10, seed=3).index(k) for k in range(25)] == first
    ranks = [list(rank_slice(16, 8, r, 2)) for r in range(2)]
    assert ranks == [list(range(16, 20)), list(range(20, 24))]


def test_example_configs_validate():
    import glob
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = sorted(glob.glob(os.path.join(repo, "examples", "*.yaml")))
    assert len(paths) == 4
    for path in paths:
        load_config(path)
    recipe = load_config(os.path.join(repo, "examples", "tinyllama_pretrain.yaml"))
    # TinyLlama (seed 001): cosine from 4e-4 after 2000 warmup steps, 1024 x 2048 = 2M-token batches, 3T tokens
    assert (recipe.optim.lr, recipe.optim.warmup_steps, recipe.optim.schedule) == (4e-4, 2000, "cosine")
    assert recipe.train.global_batch_size * recipe.data.seq_len == 2_097_152
    assert recipe.train.max_tokens == 3_000_000_000_000
    from tinylm.train.setup import new_model_config

    model = new_model_config(recipe)
    assert (model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads) == (22, 32, 4)


@pytest.mark.parametrize("mode", ["pretrain", "sft", "dpo"])
def test_example_runs_end_to_end_briefly(mode, tmp_path, monkeypatch, capsys, tiny_folder):
    """The example configs as shipped (data paths included), cut to 2 steps."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.chdir(repo)
    args = ["train", mode, f"examples/{mode}.yaml", "--set", "train.max_steps=2", "--set", "train.progress=false",
            "--set", f"checkpoint.out_dir={tmp_path / 'out'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2", "--set", "train.eval_batches=1"]
    if mode != "pretrain":
        args += ["--set", f"model.path={tiny_folder('qwen2', seed=0)}"]
    assert main(args) == 0, capsys.readouterr().err
    assert "checkpoint-0000002" in capsys.readouterr().out
    assert (tmp_path / "out" / "checkpoint-0000002" / "model.safetensors").is_file()
