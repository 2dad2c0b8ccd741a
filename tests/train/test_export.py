"""Every checkpoint is a Hugging Face folder: transformers loads it with the same logits as the model that was
trained; a LoRA adapter loads with peft on the transformers model and gives tinylm's logits with the adapter."""

from __future__ import annotations

import pytest
import torch
import transformers

import tinylm
from tinylm.train.lora import load_adapter
from tinylm.train.trainer import Trainer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 64, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _trained(tmp_path, h, data, **sections) -> Trainer:
    config = h.pretrain_config(tmp_path, data, train={"max_steps": 3}, optim={"lr": 1e-2, "warmup_steps": 0},
                               **sections)
    trainer = Trainer(config)
    trainer.result = trainer.run()
    return trainer


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_checkpoint_loads_in_transformers_with_same_logits(tmp_path, h, copy_data, family):
    trainer = _trained(tmp_path, h, copy_data, model={"family": family})
    folder = trainer.result.last_checkpoint
    expected = _logits(trainer.model.eval())
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "train_config.yaml"):
        assert (folder / name).is_file()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.allclose(_logits(reference), expected, atol=1e-4)
    assert torch.allclose(tinylm.load(folder).forward(IDS).logits, expected, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(folder).encode("> 1 2 | 1 2") == \
        trainer.tokenizer.encode("> 1 2 | 1 2")


def test_qed_checkpoint_loads_in_tinylm(tmp_path, h, copy_data):
    trainer = _trained(tmp_path, h, copy_data, model={"family": "qed"})
    llm = tinylm.load(trainer.result.last_checkpoint)
    assert llm.config.lm_head_bias and llm.config.tie_word_embeddings
    assert torch.allclose(llm.forward(IDS).logits, _logits(trainer.model.eval()), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_adapter_loads_in_peft_with_same_logits(tmp_path, h, copy_data, family, tiny_folder):
    import peft

    base = tiny_folder(family, seed=0)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}
    trainer = _trained(tmp_path, h, copy_data, model={"path": str(base), "family": None, "tokenizer": None},
                       lora=lora)
    adapter = trainer.result.last_checkpoint / "adapter"
    tinylm_with_adapter = _logits(trainer.model.eval())
    base_logits = _logits(tinylm.load(base).model)
    assert (tinylm_with_adapter - base_logits).abs().max() > 1e-3  # the adapter changed something

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with_peft = peft.PeftModel.from_pretrained(hf, adapter).eval()
    assert torch.allclose(_logits(with_peft), tinylm_with_adapter, atol=1e-4)
    # The checkpoint's own model files are the merged weights
    merged = transformers.AutoModelForCausalLM.from_pretrained(trainer.result.last_checkpoint, dtype=torch.float32)
    assert torch.allclose(_logits(merged.eval()), tinylm_with_adapter, atol=1e-4)
    assert torch.allclose(_logits(with_peft.merge_and_unload()), tinylm_with_adapter, atol=1e-4)
    # And tinylm reads the adapter back onto the base model
    llm = tinylm.load(base)
    load_adapter(llm.model, adapter)
    assert torch.allclose(_logits(llm.model), tinylm_with_adapter, atol=1e-5)
