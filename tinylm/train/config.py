"""The run config of `tinylm train`: YAML or JSON, checked on load, saved beside every checkpoint.

Every key has a type and a default here; an unknown key, a wrong type or an impossible value is one line that names
the key (`config: optim.lr must be a number, got 'fast'`). Paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tinylm.errors import TinyLMError

MODES = ("pretrain", "sft", "dpo")


class TrainConfigError(TinyLMError, ValueError):
    """A training config that cannot run: unknown key, wrong type, impossible value."""


@dataclass
class ModelSection:
    path: str | None = None  # a Hugging Face folder (e.g. an earlier checkpoint) to start from
    family: str | None = None  # or a new model: tinylm.tiny.FAMILIES[family] as the base of `config`
    config: dict = field(default_factory=dict)  # config.json keys: overrides on `family`, or a whole config
    tokenizer: str | None = None  # folder with tokenizer.json, or "tiny" (tinylm's small BPE); default: `path`'s
    init_seed: int = 0
    init_std: float = 0.02


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # .txt (a file is a document) or .jsonl (a line is a row)
    eval: list[str] = field(default_factory=list)  # held-out files; else the last `eval_fraction` of the data
    eval_fraction: float = 0.0
    text_field: str = "text"  # pretraining JSONL: the field holding the text
    seq_len: int = 512  # pretraining: packed length; SFT/DPO: longest sequence kept (longer ones are cut)
    packing: bool = False  # SFT: concatenate conversations into seq_len rows (pretraining always packs)
    shuffle: bool = True
    cache_dir: str | None = None  # token shards; default <out_dir>/token_cache
    shard_tokens: int = 1 << 26


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant, after `warmup_steps` of linear warmup from 0
    warmup_steps: int = 0
    weight_decay: float = 0.1  # applied to matrices only, not to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class TrainSection:
    max_steps: int | None = None
    max_tokens: int | None = None  # pretraining: the step count follows from tokens / (global batch x seq_len)
    global_batch_size: int = 8  # sequences (DPO: pairs) per optimizer step, whatever the number of processes
    micro_batch_size: int = 8  # per process and forward; accumulation = global / (micro x processes)
    seed: int = 0
    precision: str = "auto"  # fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 where the hardware has it
    device: str = "auto"  # cpu | cuda | auto
    max_bad_steps: int = 3  # non-finite loss or gradient this many steps in a row: stop
    eval_batches: int | None = 8  # micro-batches of held-out data per evaluation (None: all of it)
    log_every: int = 1
    peak_flops: float | None = None  # per process, for MFU; default in metrics.default_peak_flops
    progress: bool = True
    threads: int | None = None  # torch intra-op threads per process (default: torch's choice)
    loss_chunk: int = 1024  # tokens per chunk of the fused output head + loss (no (tokens x vocab) logits); 0: plain
    compile: bool = False  # torch.compile each decoder layer (forward and backward); eager if compiling fails
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward: less memory
    parallel: str = "ddp"  # under torchrun: ddp (a full copy per process) | fsdp (FSDP2: weights, gradients, AdamW sharded)
    prefetch: bool = True  # collate the next step's batches in a background thread while this step runs


@dataclass
class CheckpointSection:
    out_dir: str = ""
    every_tokens: int | None = None  # progressive checkpoints; the last step is always saved
    resume: bool = True  # continue from the newest complete checkpoint in out_dir


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    merge_on_export: bool = True  # checkpoints also hold the merged model as a Hugging Face folder


@dataclass
class DPOSection:
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: str | None = None  # frozen reference folder; default model.path (under LoRA: adapters off)
    max_prompt_length: int | None = None  # prompts keep their last tokens


@dataclass
class TrainConfig:
    mode: str = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lora: LoraSection | None = None
    dpo: DPOSection | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.checkpoint.out_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path, mode: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML/JSON file, apply `key.sub=value` overrides (values parsed as YAML), check everything."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TrainConfigError(f"cannot read config {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"config {path} must be a mapping of sections (model, data, optim, ...)")
    for item in overrides:
        _apply_override(data, item)
    return config_from_dict(data, mode)


def config_from_dict(data: dict[str, Any], mode: str | None = None) -> TrainConfig:
    data = dict(data)
    if mode is not None:
        if data.get("mode", mode) != mode:
            raise TrainConfigError(f"config: mode is {data['mode']!r} but the command is `train {mode}`")
        data["mode"] = mode
    if mode is None and "mode" not in data:
        raise TrainConfigError("config: mode is missing (pretrain, sft or dpo)")
    if data.get("mode") == "dpo":
        data.setdefault("dpo", {})
    config = _build(TrainConfig, data, "")
    _check(config)
    return config


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise TrainConfigError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"override {item!r}: {name} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _build(cls, data: Any, prefix: str):
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise TrainConfigError(f"config: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise TrainConfigError(f"config: unknown key {prefix}{unknown[0]} (known in {where}: {', '.join(names)})")
    values = {name: _convert(hints[name], data[name], f"{prefix}{name}") for name in names if name in data}
    return cls(**values)


def _convert(hint, value: Any, key: str) -> Any:
    """Check `value` against a field's type hint; sections are dataclasses, built recursively."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, f"{key}.")
    if hint in (int, float) and isinstance(value, str):
        value = _yaml11_number(value)  # PyYAML reads `lr: 4e-4` (no dot) as a string
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is int and isinstance(value, float) and value.is_integer():  # 2e6 written for 2000000
        return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint is dict and isinstance(value, dict):
        return dict(value)
    if typing.get_origin(hint) is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return list(items)
        raise TrainConfigError(f"config: {key} must be a string or a list of strings, got {value!r}")
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    raise TrainConfigError(f"config: {key} must be {kind.get(hint, hint)}, got {value!r}")


def _yaml11_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _check(config: TrainConfig) -> None:
    """Values each key alone cannot rule out, named by key."""
    c, t, o = config, config.train, config.optim
    _require(c.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {c.mode!r}")
    _require(bool(c.checkpoint.out_dir), "checkpoint.out_dir", "is required")
    _require(bool(c.data.train), "data.train", "needs at least one file")
    _require(not (c.model.path and (c.model.family or c.model.config)), "model.path",
             "starts from a checkpoint: model.family and model.config do not apply with it")
    _require(bool(c.model.path or c.model.family or c.model.config), "model",
             "needs model.path (a checkpoint folder) or model.family / model.config (a new model)")
    _require(t.max_steps is not None or (t.max_tokens is not None and c.mode == "pretrain"), "train.max_steps",
             "is required (pretraining may give train.max_tokens instead)")
    for key, value in (("train.max_steps", t.max_steps), ("train.max_tokens", t.max_tokens),
                       ("train.global_batch_size", t.global_batch_size), ("train.micro_batch_size", t.micro_batch_size),
                       ("data.seq_len", c.data.seq_len), ("train.max_bad_steps", t.max_bad_steps),
                       ("train.log_every", t.log_every), ("checkpoint.every_tokens", c.checkpoint.every_tokens),
                       ("data.shard_tokens", c.data.shard_tokens), ("train.eval_batches", t.eval_batches)):
        _require(value is None or value > 0, key, f"must be positive, got {value}")
    _require(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
             f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision", f"must be auto, fp32 or bf16, got {t.precision!r}")
    _require(t.parallel in ("ddp", "fsdp"), "train.parallel", f"must be ddp or fsdp, got {t.parallel!r}")
    _require(t.loss_chunk >= 0, "train.loss_chunk", f"must be 0 (plain loss) or positive, got {t.loss_chunk}")
    _require(not (t.parallel == "fsdp" and c.lora is not None), "train.parallel",
             "fsdp does not shard LoRA runs (the adapters are small): use ddp")
    _require(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
             f"must be auto, cpu or cuda, got {t.device!r}")
    _require(o.schedule in ("cosine", "linear", "constant"), "optim.schedule",
             f"must be cosine, linear or constant, got {o.schedule!r}")
    _require(o.lr > 0 and 0 <= o.min_lr <= o.lr, "optim.lr", f"needs 0 < lr and 0 <= min_lr <= lr ({o.lr}, {o.min_lr})")
    _require(o.warmup_steps >= 0 and o.grad_clip >= 0 and o.weight_decay >= 0, "optim",
             "warmup_steps, grad_clip and weight_decay must not be negative")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "beta1 and beta2 must be in [0, 1)")
    _require(0 <= c.data.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {c.data.eval_fraction}")
    if c.lora is not None:
        _require(c.lora.r > 0 and c.lora.alpha > 0, "lora.r", "lora.r and lora.alpha must be positive")
        _require(0 <= c.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {c.lora.dropout}")
        _require(bool(c.lora.target_modules), "lora.target_modules", "needs at least one module name")
    if c.dpo is not None:
        _require(c.mode == "dpo", "dpo", f"the dpo section only applies to `train dpo`, not {c.mode}")
        _require(c.dpo.beta > 0, "dpo.beta", f"must be positive, got {c.dpo.beta}")
        _require(0 <= c.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        _require(bool(c.model.path or c.dpo.reference or c.lora), "dpo.reference",
                 "DPO needs a reference: model.path, dpo.reference, or a lora section (adapters off)")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise TrainConfigError(f"config: {key} {message}")
