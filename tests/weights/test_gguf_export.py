"""GGUF export (tinylm/weights/gguf_writer.py) and import of every family llama.cpp has (llama, qwen2, qwen3,
qwen3moe, qwen3next; qwen2moe read): a `tinylm tiny` model of each family written as GGUF holds exactly the
quantize/dequantize round trip of its weights, loads back in tinylm with the folder's logits, and loads in llama.cpp
(llama-cpp-python) with logits that match tinylm's on the same file. The built-in model (SmolLM2-135M-Instruct)
is exported too. Tokenizers and chat templates survive: the same ids in tinylm and in llama.cpp."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import tinylm
from tests.helpers import assert_one_line_error, run_cli
from tests.weights.tiny_files import tiny_folder as bare_folder
from tinylm.config import ModelConfig
from tinylm.errors import ConfigError
from tinylm.model.transformer import CausalLM
from tinylm.tiny import FAMILIES, build_tokenizer, init_weights
from tinylm.tokenizer import Tokenizer
from tinylm.weights.gguf import load_gguf, open_gguf
from tinylm.weights.gguf_writer import convert_hf_to_gguf, write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_CPP_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next")
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q4_0": Q.Q4_0,
            "q4_1": Q.Q4_1}
IDS = [5, 77, 300, 12, 9, 101, 44, 2, 17, 260, 3]
# Kept float32 in every file (llama.cpp's converter does the same): routers, the shared-expert gate (a vector there)
_FLOAT_MATRICES = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


def llama_cpp_module():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'tinylm[bench]'; "
                                                   "it compiles llama.cpp, about 10 minutes on 2 cores)")


@pytest.fixture(scope="module")
def tiny_folders(tiny_folder):
    return {family: tiny_folder(family, seed=3) for family in LLAMA_CPP_FAMILIES}


def round_trip(values: torch.Tensor, qtype: Q) -> torch.Tensor:
    """What a weight becomes in the file: quantized and dequantized by the gguf package."""
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.half().float()
    array = values.numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape))


def expected_weights(model, qtype: Q) -> dict[str, torch.Tensor]:
    """The model's float tensors as the file must hold them: matrices whose rows are whole blocks quantized."""
    expected = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.float()
        quantized = tensor.dim() == 2 and not name.endswith(_FLOAT_MATRICES)
        if quantized and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            tensor = round_trip(tensor, qtype)
        elif quantized and qtype != Q.F32:
            tensor = tensor.half().float()  # rows that are not whole blocks: F16
        expected[name] = tensor
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return expected


def logits(model_or_path, ids=IDS) -> torch.Tensor:
    if isinstance(model_or_path, torch.nn.Module):
        with torch.no_grad():
            return model_or_path(torch.tensor([ids])).logits[0].float()
    return tinylm.load(model_or_path, dtype="float32").forward([ids]).logits[0].float()


def llama_cpp_logits(path, ids=IDS) -> torch.Tensor:
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)
    finally:
        llm.close()


def assert_close_logits(got: torch.Tensor, expected: torch.Tensor, relative: float, max_kl: float) -> None:
    """max |difference| within `relative` of the largest logit, next-token distributions within `max_kl`."""
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= relative * scale, ((got - expected).abs().max().item(), scale)
    log_p, log_q = expected.log_softmax(-1), got.log_softmax(-1)
    assert (log_p.exp() * (log_p - log_q)).sum(-1).max().item() <= max_kl


# --- tinylm -> GGUF -> tinylm


@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_file_holds_the_quantize_round_trip_of_every_weight(family, outtype, tiny_folders, tmp_path):
    """Names, Llama's q/k row order, stacked experts, Qwen3-Next's shifted norms, -exp(A_log) and split q/k/v/z
    projection all undone on the way back: each tensor equals the gguf package's round trip of the original."""
    path = convert_hf_to_gguf(tiny_folders[family], tmp_path / f"{family}.gguf", outtype)
    model = tinylm.load(tiny_folders[family], dtype="float32").model
    loaded = load_gguf(path).tensors
    expected = expected_weights(model, OUTTYPES[outtype])
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_float_round_trip_gives_the_folders_logits(family, tiny_folders, tmp_path):
    path = convert_hf_to_gguf(tiny_folders[family], tmp_path / f"{family}.gguf", "f32")
    torch.testing.assert_close(logits(path), logits(tiny_folders[family]), rtol=0, atol=1e-6)
    assert open_gguf(path).config.to_hf_dict() == tinylm.load(tiny_folders[family]).model.config.to_hf_dict()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
def test_quantized_round_trip_stays_close(family, tiny_folders, tmp_path):
    """MoE and hybrid through tinylm's own loader: Q8_0 within 10% of the largest logit, Q4_0 within 30% (random
    weights of a 64-wide model, whose logits move more than a trained model's; a misplaced tensor moves them by
    about 100%, and the exact weights are checked above)."""
    expected = logits(tiny_folders[family])
    for outtype, relative, max_kl in (("q8_0", 0.1, 1e-3), ("q4_0", 0.3, 1e-2)):
        path = convert_hf_to_gguf(tiny_folders[family], tmp_path / f"{outtype}.gguf", outtype)
        assert_close_logits(logits(path), expected, relative, max_kl)


# --- llama.cpp reads what tinylm writes


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_llama_cpp_logits_match_tinylm_on_the_same_file(family, outtype, tiny_folders, tmp_path):
    """Float files: llama.cpp's float32 sums differ in order only. Quantized files: llama.cpp also rounds each
    activation to 8 bits for its products, so the tolerance is wider (compared by size and KL)."""
    llama_cpp_module()
    path = convert_hf_to_gguf(tiny_folders[family], tmp_path / f"{family}-{outtype}.gguf", outtype)
    float_file = outtype in ("f32", "f16")
    assert_close_logits(llama_cpp_logits(path), logits(path), 2e-3 if float_file else 3e-2,
                        1e-5 if float_file else 1e-4)


def test_qwen2moe_files_are_read_as_llama_cpp_computes_them(tmp_path):
    """Qwen2-MoE (q/k/v biases, no q/k norms, a gated shared expert, top-k weights not renormalized) is read as
    tinylm's MoE family with those flags: tinylm and llama.cpp agree with the model the file was written from."""
    config = ModelConfig.from_hf_dict(FAMILIES["qwen3_moe"]).replace(
        qkv_bias=True, o_bias=False, qk_norm=False, norm_topk_prob=False, shared_expert_intermediate_size=48)
    model = CausalLM(config).eval()
    init_weights(model, seed=4, std=0.2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(5))
    path = write_gguf(tmp_path / "qwen2moe.gguf", config, dict(model.state_dict()), build_tokenizer(), "f32",
                      arch="qwen2moe")
    read = open_gguf(path).config
    assert (read.num_experts, read.norm_topk_prob, read.qk_norm, read.o_bias) == (4, False, False, False)
    assert read.shared_expert_intermediate_size == 48
    torch.testing.assert_close(logits(path), logits(model), rtol=0, atol=1e-5)
    assert_close_logits(llama_cpp_logits(path), logits(model), 2e-3, 1e-5)


def test_builtin_model_exports_and_runs_in_llama_cpp(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct (the built-in model, Q4_1) written back as F16 and Q8_0: tinylm and llama.cpp agree on
    each file's tokens and logits, and the chat template is the original's. F16: float rounding only. Q8_0:
    llama.cpp rounds activations to 8 bits, which moved the next-token distribution by a mean KL of 0.004 on
    both the original Q4_1 file and this Q8_0 (measured), hence the KL and top-1 bounds."""
    source = load_gguf(smollm2_gguf)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = source.tokenizer.apply_chat_template(chat)
    ids = source.tokenizer.encode(prompt)
    for outtype in ("f16", "q8_0"):
        path = write_gguf(tmp_path / f"smollm2-{outtype}.gguf", source.config, source.tensors, source.tokenizer,
                          outtype)
        exported = open_gguf(path).tokenizer()
        assert exported.apply_chat_template(chat) == prompt
        assert exported.encode(prompt) == ids
        assert llama_cpp_tokens(path, prompt) == ids
        got, expected = llama_cpp_logits(path, ids), logits(path, ids)
        if outtype == "f16":
            assert_close_logits(got, expected, 5e-3, 1e-4)
        else:
            log_p, log_q = expected.log_softmax(-1), got.log_softmax(-1)
            assert (log_p.exp() * (log_p - log_q)).sum(-1).mean().item() < 0.02
            assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


# --- tokenizers and chat templates


def llama_cpp_tokens(path, text: str) -> list[int]:
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()


TEXTS = ["Hello world", " leading space and trailing ", "The weather in Paris is sunny.\nNew line,\n\ttab and  two",
         "Café naïve résumé jalapeño Über", "Numbers 12345 and 3.14159", "Emoji: 🦙🚀 in text",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("family", ["qwen2", "smollm2", "llama3", "tinyllama"])
def test_tokenizer_and_template_survive(family, folders, tmp_path):
    """Byte-level BPE with Qwen2's, SmolLM2's and Llama-3's pre-tokenizers, and SentencePiece-style BPE
    (TinyLlama): the GGUF's tokenizer, rebuilt by tinylm and by llama.cpp, gives the original's ids."""
    original = Tokenizer.from_folder(folders[family])  # tests/conftest.py: one per pipeline
    path = _tiny_llama_with(original, tmp_path / f"{family}.gguf")
    rebuilt = open_gguf(path).tokenizer()
    for text in TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
    assert rebuilt.apply_chat_template(CHAT) == original.apply_chat_template(CHAT)
    for text in TEXTS + [original.apply_chat_template(CHAT)]:
        assert llama_cpp_tokens(path, text) == original.encode(text), text


def _tiny_llama_with(tokenizer: Tokenizer, path):
    config = ModelConfig.from_hf_dict({**FAMILIES["llama"], "vocab_size": tokenizer.vocab_size})
    model = CausalLM(config)
    init_weights(model, seed=0)
    return write_gguf(path, config, dict(model.state_dict()), tokenizer, "f32")


def test_tiny_tokenizer_ids_and_template_in_llama_cpp(tiny_folders, tmp_path):
    path = convert_hf_to_gguf(tiny_folders["qwen3"], tmp_path / "qwen3.gguf", "q8_0")
    original = Tokenizer.from_folder(tiny_folders["qwen3"])
    assert open_gguf(path).tokenizer().apply_chat_template(CHAT) == original.apply_chat_template(CHAT)
    for text in TEXTS:
        assert llama_cpp_tokens(path, text) == original.encode(text), text


# --- the command and its errors


def test_convert_command_writes_a_gguf(capsys, tiny_folders, tmp_path):
    code, out, err = run_cli(capsys, "convert", str(tiny_folders["qwen3_next"]), str(tmp_path / "out.gguf"),
                             "--outtype", "q8_0")
    assert code == 0 and "out.gguf" in out and not err
    assert open_gguf(tmp_path / "out.gguf").config.model_type == "qwen3_next"


def test_k_quants_are_one_line_errors(capsys, tiny_folders, tmp_path):
    code, _, err = run_cli(capsys, "convert", str(tiny_folders["llama"]), str(tmp_path / "out.gguf"), "--outtype", "q4_k")
    assert_one_line_error(code, err, "outtype", "q4_0", "llama-quantize")
    assert not (tmp_path / "out.gguf").exists()


def test_what_llama_cpp_cannot_do_is_a_warning(capsys, tmp_path):
    folder = bare_folder(tmp_path / "moe", "qwen3_moe", norm_topk_prob=False)
    code, _, err = run_cli(capsys, "convert", str(folder), str(tmp_path / "moe.gguf"), "--outtype", "f16")
    assert code == 0 and err.startswith("tinylm: warning: llama.cpp's qwen3moe renormalizes"), err


def test_hybrid_layer_plan_without_a_period_is_refused(tmp_path):
    data = {**FAMILIES["qwen3_next"], "layer_types": ["linear_attention", "full_attention", "full_attention",
                                                      "linear_attention"]}
    config = ModelConfig.from_hf_dict(data)
    model = CausalLM(config)
    init_weights(model, seed=0)
    with pytest.raises(ConfigError, match="every n layers"):
        write_gguf(tmp_path / "x.gguf", config, dict(model.state_dict()), None, "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_qed_has_no_llama_cpp_architecture(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="llama.cpp has no architecture for the qed family"):
        convert_hf_to_gguf(tiny_folder("qed", seed=0), tmp_path / "qed.gguf")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
def test_q8_0_experts_and_split_projection_load_as_their_blocks(family, tiny_folders, tmp_path):
    """Quantized loading takes each expert's Q8_0 blocks out of the stacked tensor (and Qwen3-Next's projection
    from its two halves) as they are: int8 layers in groups of 32 compute what the dequantized file computes."""
    path = convert_hf_to_gguf(tiny_folders[family], tmp_path / "q8.gguf", "q8_0")
    exact = tinylm.load(path, dtype="float32", quantize="int8:int8_group_size=32,kernel_dtype=model")
    torch.testing.assert_close(exact.forward([IDS]).logits[0], logits(path), rtol=1e-5, atol=1e-5)
