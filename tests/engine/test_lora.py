"""LoRA adapters served unmerged: rows of one batch, each with its own adapter or none, give the tokens of the model
with that adapter merged; prefix caching keeps adapters apart; loading is refused where it cannot work."""

from __future__ import annotations

import pytest

import tinylm
from tests.lora_helpers import make_adapter
from tinylm.errors import ConfigError, WeightsError

GREEDY = tinylm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def folders(tiny_folder, tmp_path_factory):
    base = tiny_folder("llama", 2)
    root = tmp_path_factory.mktemp("adapters")
    return {"base": (None, base), "a1": make_adapter(base, root / "a1", 1), "a2": make_adapter(base, root / "a2", 2)}


def _merged_tokens(folder, prompt) -> list[int]:
    return tinylm.load(folder).generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_one_batch_mixes_adapters_and_the_base_model(folders):
    llm = tinylm.load(folders["base"][1])
    engine = llm.engine
    ids = {"base": 0, "a1": engine.load_lora("a1", folders["a1"][0]), "a2": engine.load_lora("a2", folders["a2"][0])}
    prompt = llm.encode("Once upon a time")
    for name, lora_id in ids.items():
        engine.add_request(name, prompt, GREEDY, lora_id=lora_id)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        step = engine.step()
        assert len(step) == 3  # the three rows decode together, every step
        for output in step:
            tokens.setdefault(output.request_id, []).append(output.token_id)
    expected = {name: _merged_tokens(folders[name][1] if name != "base" else folders["base"][1], prompt)
                for name in ids}
    assert tokens == expected and len({tuple(t) for t in tokens.values()}) == 3


def test_prefix_cache_keeps_adapters_apart(folders):
    """The same prompt under two adapters: the second must not reuse the first's cached K/V."""
    llm = tinylm.load(folders["base"][1])
    a1 = llm.engine.load_lora("a1", folders["a1"][0])
    prompt = llm.encode("The capital of France is Paris. " * 4)
    first = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    adapter = tinylm.LoRARequest("a1", a1, str(folders["a1"][0]))
    second = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False, lora_request=adapter)
    assert first == _merged_tokens(folders["base"][1], prompt)
    assert second[0].outputs[0].token_ids == _merged_tokens(folders["a1"][1], prompt)


def test_python_api_loads_an_adapter_on_first_use(folders):
    llm = tinylm.load(folders["base"][1])
    request = tinylm.LoRARequest("a2", 7, str(folders["a2"][0]))
    out = llm.generate("Hello there", GREEDY, use_tqdm=False, lora_request=request)[0].outputs[0].token_ids
    assert out == _merged_tokens(folders["a2"][1], llm.encode("Hello there"))
    assert llm.engine.loras.ids == {"a2": 1}
    with pytest.raises(ValueError, match="not loaded"):
        llm.generate("Hi", GREEDY, lora_request=tinylm.LoRARequest("missing"))


def test_loading_refusals(folders, tmp_path):
    llm = tinylm.load(folders["base"][1])
    with pytest.raises(WeightsError, match="not a readable LoRA adapter"):
        llm.engine.load_lora("x", tmp_path)
    llm.engine.load_lora("a1", folders["a1"][0])
    with pytest.raises(ValueError, match="already loaded"):
        llm.engine.load_lora("a1", folders["a1"][0])
    llm.engine.add_request("r", [5, 6, 7], GREEDY, lora_id=1)
    with pytest.raises(ValueError, match="in use by 1"):
        llm.engine.unload_lora("a1")
    llm.engine.abort("r")
    assert llm.engine.unload_lora("a1") == 1 and not llm.engine.loras.ids
    compiled = tinylm.load(folders["base"][1], compile=True)
    with pytest.raises(ConfigError, match="eager engine"):
        compiled.engine.load_lora("a1", folders["a1"][0])
