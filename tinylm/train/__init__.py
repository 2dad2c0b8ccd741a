"""Training: `tinylm train pretrain|sft|dpo CONFIG`.

config (run config, validated) -> setup (model, tokenizer, optimizer, schedule) -> tasks (rows, collate, objective per
mode: pretrain over token shards, SFT over chat-templated conversations, DPO over preference pairs) -> trainer (the
loop: accumulation, clipping, non-finite guard, logs) -> run_state / checkpoint (atomic checkpoints, exact resume);
lora (adapters in PEFT's layout), dist (torchrun data parallelism).
"""

from tinylm.train.config import TrainConfig, TrainConfigError, load_config
from tinylm.train.trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "TrainingError", "load_config", "train"]
