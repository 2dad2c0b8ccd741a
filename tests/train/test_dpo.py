"""DPO: the loss equals a hand computation on fixed log-probabilities; data is tokenized as TRL does; a short LoRA
run (reference = the adapter-disabled model) raises the reward accuracy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tinylm.tiny import FAMILIES, build_tokenizer, init_weights
from tinylm.config import ModelConfig
from tinylm.model.transformer import CausalLM
from tinylm.train import train
from tinylm.train.config import config_from_dict
from tinylm.train.losses import dpo_loss, sequence_logps
from tinylm.train.metrics import read_log
from tinylm.train.preference import collate_pairs, tokenize_preference
from tinylm.train.tasks import DPOObjective


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_by_hand(smoothing):
    pi_c, pi_r = [-10.0, -7.0, -3.0], [-12.0, -6.0, -3.5]
    ref_c, ref_r = [-11.0, -7.5, -2.0], [-11.5, -6.2, -4.0]
    beta = 0.1
    losses, chosen, rejected = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pi_c, pi_r, ref_c, ref_r)),
                                        beta=beta, label_smoothing=smoothing)
    for i in range(3):
        logit = (pi_c[i] - pi_r[i]) - (ref_c[i] - ref_r[i])
        by_hand = (-math.log(_sigmoid(beta * logit)) * (1 - smoothing)
                   - math.log(_sigmoid(-beta * logit)) * smoothing)
        assert losses[i].item() == pytest.approx(by_hand, abs=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pi_c[i] - ref_c[i]), abs=1e-12)
        assert rejected[i].item() == pytest.approx(beta * (pi_r[i] - ref_r[i]), abs=1e-12)
    # Row 0: logit = (-10 + 12) - (-11 + 11.5) = 1.5, so the unsmoothed loss is softplus(-0.15) = 0.62096...
    if smoothing == 0:
        assert losses[0].item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-12)


def test_plain_rows_tokenize_as_trl():
    tokenizer = build_tokenizer()
    row = {"prompt": "The sky is", "chosen": " blue", "rejected": " green"}
    out = tokenize_preference(tokenizer, row, max_prompt_length=None, max_length=64)
    eos = tokenizer.eos_token_id
    assert out == {"prompt_ids": tokenizer.encode("The sky is", add_special_tokens=False),
                   "chosen_ids": tokenizer.encode(" blue", add_special_tokens=False) + [eos],
                   "rejected_ids": tokenizer.encode(" green", add_special_tokens=False) + [eos]}
    short = tokenize_preference(tokenizer, row, max_prompt_length=2, max_length=4)
    assert short["prompt_ids"] == out["prompt_ids"][-2:] and len(short["prompt_ids"] + short["chosen_ids"]) <= 4


def test_conversational_rows_use_the_template():
    tokenizer = build_tokenizer()
    row = {"prompt": [{"role": "user", "content": "Capital of France?"}],
           "chosen": [{"role": "assistant", "content": "Paris."}],
           "rejected": [{"role": "assistant", "content": "Rome."}]}
    out = tokenize_preference(tokenizer, row, None, 128)
    assert tokenizer.decode(out["prompt_ids"], skip_special_tokens=False) == \
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(out["chosen_ids"], skip_special_tokens=False) == "Paris.<|im_end|>\n<|im_end|>"


def test_objective_logps_match_unpadded_forward():
    config = ModelConfig.from_hf_dict(FAMILIES["qwen2"])
    model = CausalLM(config)
    init_weights(model, seed=2)
    tokenizer = build_tokenizer()
    rows = [tokenize_preference(tokenizer, {"prompt": p, "chosen": c, "rejected": r}, None, 64)
            for p, c, r in [("Once upon", " a time", " the sea and the stars"), ("2 + 2 =", " 4", " five")]]
    batch = collate_pairs(rows, pad_id=0)
    with torch.no_grad():
        logps = sequence_logps(model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["input_ids"], batch["completion_mask"])
        for i, (row, side) in enumerate([(rows[0], "chosen"), (rows[1], "chosen"), (rows[0], "rejected"),
                                         (rows[1], "rejected")]):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            by_hand = sum(logprobs[t - 1, ids[t]].item() for t in range(len(row["prompt_ids"]), len(ids)))
            assert logps[i].item() == pytest.approx(by_hand, abs=1e-4)
        objective = DPOObjective(model, copy.deepcopy(model), beta=0.1, label_smoothing=0.0)
        loss_sum, metrics = objective(**batch)
    assert loss_sum.item() == pytest.approx(2 * math.log(2), abs=1e-5)  # policy == reference: each pair costs ln 2
    assert metrics[:4].abs().max().item() < 1e-5


def test_lora_dpo_run_learns_the_preference(tmp_path, h, tiny_folder):
    model = tiny_folder("qwen2", seed=0)
    pairs = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
              "chosen": [{"role": "assistant", "content": "Paris."}],
              "rejected": [{"role": "assistant", "content": "I do not know."}]} for i in range(16)]
    data = h.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    config = config_from_dict({
        "mode": "dpo", "model": {"path": str(model)},
        "data": {"train": [str(data)], "seq_len": 64, "eval_fraction": 0.25},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "train": {"max_steps": 8, "global_batch_size": 4, "micro_batch_size": 2, "precision": "fp32",
                  "progress": False, "threads": 1},
        "checkpoint": {"out_dir": str(tmp_path / "dpo")},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["all-linear"]},
        "dpo": {"beta": 0.1},
    })
    result = train(config)
    log = read_log(config.out_dir / "log.jsonl")
    steps = [r for r in log if "rewards/margins" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B starts at 0: policy == reference
    assert steps[-1]["rewards/accuracies"] == 1.0 and steps[-1]["rewards/margins"] > 0
    assert result.losses[-1] < 0.5 * math.log(2)
    final = [r for r in log if r.get("event") == "checkpoint"][-1]
    assert final["eval_rewards/accuracies"] == 1.0
    assert (result.last_checkpoint / "adapter" / "adapter_model.safetensors").is_file()
