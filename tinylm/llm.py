"""The public API, shaped like vLLM's: `load()` -> `LLM` with forward, generate, stream and chat.

`LLM` also takes vLLM's constructor and call shapes, so that a vLLM offline script runs with only its import
changed: `LLM(model=..., dtype=..., quantization=..., seed=...)`, `generate(prompts, sampling_params)` and
`chat(messages, sampling_params)` returning RequestOutputs with `.outputs` (n CompletionOutputs each) and vLLM's
logprob dictionaries. tinylm's shorter forms stay: `res[0].text`, `res[0].token_ids`, `res[0].logprobs[0].top`.

This file holds the entry points: the LLM class and `load`. What they return is tinylm/outputs.py, filled from the
engine's steps by tinylm/request_outputs.py; how their arguments become a model, a draft and an EngineConfig is
tinylm/llm_loading.py. All three sit below this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from tinylm import hub
from tinylm.engine.engine import EngineBusyError, EngineConfig, LLMEngine, make_invariant, model_context
from tinylm.engine.lora import LoRARequest
from tinylm.engine.kv_pool import pool_dtype
from tinylm.engine.ngram import NGRAM
from tinylm.engine.speculative import check_num_tokens
from tinylm.errors import ConfigError
from tinylm.llm_loading import (build_engine_config, check_extra_args, file_bytes, load_draft, load_for_engine,
                                native_bf16, resolve_device, resolve_dtype, speculative_draft, with_tokenizer)
from tinylm.model.transformer import CausalLMOutput
from tinylm.outputs import CompletionOutput, Logprob, RequestOutput, StepEvent
from tinylm.request_outputs import OutputCollector, choice_params, step_event
from tinylm.sampling_params import SamplingParams
from tinylm.weights.loader import LoadedModel

# The output types (tinylm/outputs.py) and native_bf16 (tinylm/llm_loading.py) live apart now; re-exported so that
# `from tinylm.llm import X` keeps working for every name it gave before the split
__all__ = ["LLM", "load", "Prompt", "Message", "StepEvent", "Logprob", "CompletionOutput", "RequestOutput",
           "native_bf16"]

Prompt = str | Sequence[int] | dict  # text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]}
Message = dict


class LLM:
    def __init__(self, model: str | os.PathLike | LoadedModel | None = None, tokenizer: str | os.PathLike | None = None,
                 *, dtype: str | torch.dtype = "auto", quantization: str | None = None, seed: int | None = None,
                 max_model_len: int | None = None, device: str = "auto", compile: bool | None = None,
                 batch_invariant: bool | None = None,
                 skip_tokenizer_init: bool = False, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool | None = None,
                 block_size: int | None = None, kv_cache_dtype: str = "auto", kv_cache_memory_bytes: int | None = None,
                 speculative_config: dict | None = None, engine_config: EngineConfig | None = None,
                 draft: LoadedModel | str | None = None, check_finite: bool = True, **kwargs) -> None:
        """vLLM's constructor: `model` is a built-in name, a Hugging Face folder or a .gguf file; dtype "auto"
        (the checkpoint's, bfloat16 for float16 ones on CPU; for GGUF files bfloat16 where the device computes it
        natively, else float32; on CPUs without native bfloat16, GGUF files and 16-bit checkpoints compute in float32
        on a GGUF's own Q4_0-Q8_0 and Q4_K-Q6_K blocks, exactly, or on linear weights stored in bfloat16: see
        resolve_dtype, resolve_weight_dtype and load_for_engine), "float32", "bfloat16",
        "float16" or a torch.dtype; compile None (on unless TINYLM_COMPILE=0, tinylm/engine/compile_cache.py), True
        or False; quantization None or a
        tinylm policy ("int8", "int4", "w8a8", ...); seed seeds torch's
        global generator (requests without their own seed draw from it), as vLLM seeds its workers; device "auto"
        (cuda when available), "cpu" or "cuda". Other vLLM arguments: _IGNORED_ARGS are accepted, _DEFAULT_ONLY
        only at their defaults, anything else is refused with a ValueError naming it.

        tinylm's own form, `LLM(loaded_model, engine_config=..., draft=...)`, wraps a model already loaded
        (what `tinylm.load` builds)."""
        check_extra_args(kwargs)
        if isinstance(model, LoadedModel):
            self._attach(model, tokenizer if isinstance(tokenizer, EngineConfig) else engine_config, draft)
            return
        # Everything checkable without weights is checked before any are read
        config = engine_config or build_engine_config(
            compile=compile, batch_invariant=batch_invariant, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            block_size=block_size, kv_cache_dtype=kv_cache_dtype, kv_cache_bytes=kv_cache_memory_bytes)
        if seed is not None:
            torch.manual_seed(seed)
        device = resolve_device(device)
        path = hub.resolve(model)
        loaded = load_for_engine(path, dtype, device, quantization, check_finite, config.batch_invariant)
        loaded = with_tokenizer(loaded, tokenizer, model, skip_tokenizer_init)
        model_context(loaded.model.config.max_position_embeddings, config.max_model_len)
        if speculative_config:
            draft, config.num_speculative_tokens = speculative_draft(speculative_config, loaded, dtype, device)
        self._attach(loaded, config, draft)
        self.model_name = hub.DEFAULT_MODEL if model is None else str(model)

    def _attach(self, loaded: LoadedModel, engine_config: EngineConfig | None,
                draft: LoadedModel | str | None) -> None:
        self.loaded = loaded
        self.draft = draft  # speculative decoding's draft model, "[ngram]" or None (tinylm/engine/speculative.py)
        self.model = loaded.model
        self.config = loaded.model.config
        self.tokenizer = loaded.tokenizer
        self.engine_config = engine_config or EngineConfig()
        if self.engine_config.batch_invariant:  # now, so llm.forward computes what the engine will sample with
            make_invariant(self.model)
        self.model_name = str(loaded.source)  # what get_default_sampling_params reads the recommendation of
        self._engine: LLMEngine | None = None
        self._request_ids = 0  # numbers RequestOutputs and the engine's requests alike
        self._outputs = OutputCollector(self.tokenizer)

    @property
    def engine(self) -> LLMEngine:
        """The continuous-batching engine behind generate/stream/chat and the server (created on first use, with
        engine_config; engine_for gives it another config)."""
        if self._engine is None:
            self._engine = LLMEngine(self.model, self.tokenizer, self.eos_token_ids, self.engine_config,
                                     draft_model=self.draft_model)
        return self._engine

    def engine_for(self, config: EngineConfig) -> LLMEngine:
        """This LLM's engine with `config` (the server's create_app asks for its EngineConfig this way): the
        current engine when it already has that config, else a new one in its place. An engine a running server
        steps (its `driver`) is never shared: the new one takes its place here and the server keeps it. Raises
        EngineBusyError when an engine of another config still holds requests of this LLM's own calls."""
        current = self._engine
        if current is not None and current.driver is None:
            if current.config == config:
                return current
            if current.has_unfinished():
                raise EngineBusyError(f"the engine still runs {len(current.requests)} requests; finish or close "
                                      "them before configuring another engine")
        self.engine_config, self._engine = config, None
        return self.engine

    @property
    def draft_model(self):
        """What the engine drafts with: the draft's nn.Module, "[ngram]", or None."""
        return self.draft.model if isinstance(self.draft, LoadedModel) else self.draft

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def get_tokenizer(self):
        """vLLM's accessor: the model's tinylm Tokenizer (encode, decode, apply_chat_template), or None."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the model's recommended sampling (generation_config.json, a built-in model's card), else the
        SamplingParams defaults. generate/chat use it when given no sampling_params, as vLLM does."""
        return SamplingParams(**hub.recommended_sampling(self.model_name))

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """Full-sequence forward: logits (B, T, V) and the HF-convention loss when labels are given.

        logits_to_keep=N: logits (B, N, V) of the last N positions only (as transformers' argument), which spares
        the (B, T, V) tensor when only the next-token distribution is wanted; the loss needs every position."""
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError("logits_to_keep must be >= 0, and 0 (every position) when labels are given")
        tensors = [_as_batch(x, self.device) for x in (input_ids, attention_mask, labels, position_ids)]
        with torch.inference_mode():
            return self.model(tensors[0], attention_mask=tensors[1], labels=tensors[2], position_ids=tensors[3],
                              logits_to_keep=logits_to_keep)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
                 lora_request=None) -> list[RequestOutput]:
        """Complete each prompt (text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]}) with
        SamplingParams.n completions each; all run as one continuous batch. use_tqdm is accepted (tinylm shows
        no progress bar); lora_request: a LoRARequest (a PEFT adapter folder, loaded on first use, served
        unmerged: tinylm/engine/lora.py)."""
        prompts, params = self._normalize(prompts, sampling_params)
        lora_id = self._lora_id(lora_request)
        outputs = []
        for (text, ids), p in zip(prompts, params):
            self._request_ids += 1
            outputs.append(self._outputs.new_output(str(self._request_ids), text, ids, p))
        for events in self._steps([ids for _, ids in prompts], params, lora_id):
            for event in events:
                self._outputs.collect(outputs[event.index], event, params[event.index])
        return outputs

    def stream(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[StepEvent]:
        """Yield each generated token as a StepEvent (index, token_id, text delta, logprob, finish_reason, choice).

        `text` deltas never split a UTF-8 character and never show part of a stop string.
        """
        prompts, params = self._normalize(prompts, sampling_params)
        for events in self._steps([ids for _, ids in prompts], params):
            yield from events

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request=None, chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools: list | None = None,
             chat_template_kwargs: dict | None = None, **template_kwargs) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or several; the model's chat template (or chat_template:
        a template name of the model or a template's source) is applied. vLLM's arguments; content may be a
        string or a list of {"type": "text", "text": ...} parts."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        options = {**(chat_template_kwargs or {}), **template_kwargs,
                   "add_generation_prompt": add_generation_prompt, "tools": tools}
        if chat_template is not None:
            options["chat_template"] = chat_template
        if continue_final_message:
            options["continue_final_message"] = True
        prompts = [self.apply_chat_template([_plain_message(m) for m in c], **options) for c in conversations]
        return self.generate(prompts, sampling_params, lora_request=lora_request)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer; chat needs one")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **kwargs)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_id)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        return ids

    def info(self) -> dict:
        from tinylm.quant.memory import weight_bytes
        from tinylm.weights.loader import build_model

        # Counted on the unquantized architecture (a meta model, no memory): packed int4 buffers are not parameters
        params = {id(p): p for p in build_model(self.config).parameters()}.values()
        return {
            "source": str(self.loaded.source),
            "format": self.loaded.format,
            "architecture": self.config.model_type,
            "layers": self.config.num_hidden_layers,
            "hidden_size": self.config.hidden_size,
            "heads": f"{self.config.num_attention_heads} query / {self.config.num_key_value_heads} kv",
            "vocab_size": self.config.vocab_size,
            "context": self.config.max_position_embeddings,
            "parameters": sum(p.numel() for p in params),
            "bytes": weight_bytes(self.model),  # what the loaded weights (quantized or not) hold in memory
            "file_bytes": file_bytes(self.loaded.source),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }

    def _normalize(self, prompts, sampling_params) -> tuple[list[tuple[str | None, list[int]]], list[SamplingParams]]:
        """(prompt text or None, token ids) per prompt, and its SamplingParams."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        pairs = [self._prompt_ids(p) for p in prompts]
        for _, ids in pairs:
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.config.vocab_size - 1})")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(pairs)
        if len(params) != len(pairs):
            raise ValueError(f"{len(params)} SamplingParams for {len(pairs)} prompts")
        return pairs, params

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            return self._dict_prompt(prompt)
        if isinstance(prompt, str):
            return prompt, self.encode(prompt)
        return None, [int(t) for t in prompt]

    def _dict_prompt(self, prompt: dict) -> tuple[str | None, list[int]]:
        """vLLM's TextPrompt {"prompt": str} and TokensPrompt {"prompt_token_ids": [...]}; nothing multimodal."""
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
        if unknown:
            raise ValueError(f"prompt dicts take 'prompt' or 'prompt_token_ids'; tinylm does not support "
                             f"{', '.join(unknown)}")
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if not isinstance(prompt.get("prompt"), str):
            raise ValueError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (a list of ids)")
        return prompt["prompt"], self.encode(prompt["prompt"])

    def _lora_id(self, lora_request) -> int:
        if lora_request is None:
            return 0
        if not isinstance(lora_request, LoRARequest):
            raise ValueError("lora_request must be a tinylm.LoRARequest(lora_name, lora_int_id, lora_path), got "
                             f"{type(lora_request).__name__}")
        if self.engine.driver is not None and self.engine.driver.is_alive:
            raise EngineBusyError("this LLM's engine is serving HTTP requests; load adapters through the server")
        name, loaded = lora_request.lora_name, self.engine.loras.ids
        if name in loaded:
            return loaded[name]
        if not lora_request.lora_path:
            raise ValueError(f"LoRA adapter {name!r} is not loaded and the request gives no lora_path")
        return self.engine.load_lora(name, lora_request.lora_path)

    def _steps(self, prompt_ids: list[list[int]], params: list[SamplingParams],
               lora_id: int = 0) -> Iterator[list[StepEvent]]:
        """Run every prompt's n completions through the engine; yield each step's events. Every prompt is checked
        before any runs, and leaving early (an exception, a closed stream) cancels what is left."""
        engine = self.engine
        if engine.driver is not None and engine.driver.is_alive:  # one thread steps an engine (not thread-safe)
            raise EngineBusyError("this LLM's engine is serving HTTP requests; generate, stream and chat "
                                  "work again once the server stops")
        for ids, p in zip(prompt_ids, params):
            engine.validate(ids, p)
        where: dict[str, tuple[int, int]] = {}  # request id -> (prompt index, choice)
        try:
            for index, (ids, p) in enumerate(zip(prompt_ids, params)):
                for choice in range(p.n):
                    self._request_ids += 1
                    request_id = f"llm-{self._request_ids}"
                    engine.add_request(request_id, ids, choice_params(p, choice), lora_id=lora_id)
                    where[request_id] = (index, choice)
            while any(r in engine.requests for r in where):
                yield [step_event(*where[o.request_id], o) for o in engine.step() if o.request_id in where]
        finally:
            for request_id in where:
                engine.abort(request_id)


def _plain_message(message: Message) -> Message:
    """A message as chat templates expect it: list-of-parts content (OpenAI's, vLLM's) joined into one string."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
        raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
    return {**message, "content": "".join(str(part.get("text", "")) for part in content)}


def _as_batch(value, device) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    if tensor.dim() == 1:
        tensor = tensor[None]
    return tensor.to(device)


def load(model: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
         quantize: str | None = None, compile: bool | None = None, batch_invariant: bool = True,
         draft: str | os.PathLike | None = None,
         draft_quantize: str | None = None, num_speculative_tokens: int = 3, kv_cache_dtype: str = "auto",
         check_finite: bool = True) -> LLM:
    """Load a built-in model name, a Hugging Face folder, or a .gguf file; dtype "auto" as LLM's (the built-in
    model: bfloat16 where the CPU computes it natively, else float32 on its own Q4_1 / Q8_0 blocks); quantize:
    None | "int8" | "int4" | a policy name. compile: decode through torch.compile with fused projections
    (inference only, see tinylm/engine/compiled.py); None: on unless TINYLM_COMPILE=0, where a C++ compiler is
    present.
    batch_invariant: a request's tokens and logprobs the same bits whatever shares its batch, and llm.forward the
    bits the engine samples with (tinylm/model/invariant.py); False: the library products. draft: a
    smaller model with the same tokenizer (or this one with draft_quantize),
    or "[ngram]" (prompt lookup, tinylm/engine/ngram.py), that proposes num_speculative_tokens tokens per step
    for the loaded model to verify (speculative decoding: the same outputs, fewer target passes;
    tinylm/engine/speculative.py). kv_cache_dtype: "auto" (the model's dtype) or "int8" (half the cache memory
    and decode reads, tinylm/engine/kv_pool.py). check_finite=False skips the NaN / Inf scan of the weights
    (tinylm/weights/finite.py), for speed with files already known to be sound."""
    pool_dtype(kv_cache_dtype, torch.float32)  # a bad name fails before any weights are read
    if draft is not None:
        check_num_tokens(num_speculative_tokens)  # before any weights are read
    if draft_quantize is not None and (draft is None or draft == NGRAM):
        raise ValueError("draft_quantize quantizes a draft model: give one with draft")
    path = hub.resolve(model)
    loaded = load_for_engine(path, dtype, device, quantize, check_finite, batch_invariant)
    dtype = resolve_dtype(dtype, path, device)
    draft_loaded = draft if draft in (None, NGRAM) else load_draft(loaded, draft, dtype, device, draft_quantize,
                                                                   check_finite)
    config = build_engine_config(compile=compile, batch_invariant=batch_invariant,
                                 num_speculative_tokens=num_speculative_tokens, kv_cache_dtype=kv_cache_dtype)
    llm = LLM(loaded, engine_config=config, draft=draft_loaded)
    llm.model_name = hub.DEFAULT_MODEL if model is None else str(model)
    return llm


