"""The public API, shaped like vLLM's: `load()` -> `LLM` with forward, generate, stream and chat."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tinylm import hub
from tinylm.engine.engine import EngineConfig, LLMEngine
from tinylm.engine.kv_pool import pool_dtype
from tinylm.engine.sequence import StepOutput, TokenLogprob
from tinylm.engine.ngram import NGRAM
from tinylm.engine.speculative import check_draft, check_num_tokens
from tinylm.errors import ConfigError
from tinylm.model.transformer import CausalLMOutput
from tinylm.sampling_params import SamplingParams
from tinylm.weights.loader import LoadedModel, load_model

Prompt = str | Sequence[int]
Message = dict


@dataclass
class StepEvent:
    """One generated token of one prompt, with the text it completes (may be empty while UTF-8 is partial)."""

    index: int  # which prompt of the call
    token_id: int
    text: str
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop" (EOS / stop string / stop token) or "length"


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


class LLM:
    def __init__(self, loaded: LoadedModel, engine_config: EngineConfig | None = None,
                 draft: LoadedModel | str | None = None) -> None:
        self.loaded = loaded
        self.draft = draft  # speculative decoding's draft model, "[ngram]" or None (tinylm/engine/speculative.py)
        self.model = loaded.model
        self.config = loaded.model.config
        self.tokenizer = loaded.tokenizer
        self.engine_config = engine_config or EngineConfig()
        self._engine: LLMEngine | None = None
        self._request_ids = 0

    @property
    def engine(self) -> LLMEngine:
        """The continuous-batching engine behind generate/stream/chat (created on first use)."""
        if self._engine is None:
            self._engine = LLMEngine(self.model, self.tokenizer, self.eos_token_ids, self.engine_config,
                                     draft_model=self.draft_model)
        return self._engine

    @property
    def draft_model(self):
        """What the engine drafts with: the draft's nn.Module, "[ngram]", or None."""
        return self.draft.model if isinstance(self.draft, LoadedModel) else self.draft

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

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

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); several prompts run as one padded batch."""
        prompts, params = self._normalize(prompts, sampling_params)
        outputs = [RequestOutput(p if isinstance(p, str) else None, ids) for p, ids in prompts]
        for events in self._steps([ids for _, ids in prompts], params):
            for event in events:
                _collect(outputs[event.index], event, params[event.index])
        return outputs

    def stream(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
               ) -> Iterator[StepEvent]:
        """Yield each generated token as a StepEvent (index, token_id, text delta, logprob, finish_reason).

        `text` deltas never split a UTF-8 character and never show part of a stop string.
        """
        prompts, params = self._normalize(prompts, sampling_params)
        for events in self._steps([ids for _, ids in prompts], params):
            yield from events

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, **template_kwargs
             ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or several; the model's chat template is applied."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, **template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: list[Message], **kwargs) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer; chat needs one")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)

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
            "file_bytes": _file_bytes(self.loaded.source),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }

    def _normalize(self, prompts, sampling_params) -> tuple[list[tuple[Prompt, list[int]]], list[SamplingParams]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        pairs = [(p, self.encode(p) if isinstance(p, str) else [int(t) for t in p]) for p in prompts]
        for _, ids in pairs:
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.config.vocab_size - 1})")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(pairs)
        if len(params) != len(pairs):
            raise ValueError(f"{len(params)} SamplingParams for {len(pairs)} prompts")
        return pairs, params

    def _steps(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> Iterator[list[StepEvent]]:
        """Run every prompt through the engine; yield each step's events. Every prompt is checked before any
        runs, and leaving early (an exception, a closed stream) cancels what is left."""
        engine = self.engine
        for ids, p in zip(prompt_ids, params):
            engine.validate(ids, p)
        index_of: dict[str, int] = {}
        try:
            for index, (ids, p) in enumerate(zip(prompt_ids, params)):
                self._request_ids += 1
                request_id = f"llm-{self._request_ids}"
                engine.add_request(request_id, ids, p)
                index_of[request_id] = index
            while any(r in engine.requests for r in index_of):
                yield [_event(index_of[o.request_id], o) for o in engine.step() if o.request_id in index_of]
        finally:
            for request_id in index_of:
                engine.abort(request_id)


def _event(index: int, output: StepOutput) -> StepEvent:
    return StepEvent(index, output.token_id, output.text, output.logprob, output.finish_reason)


def _collect(output: RequestOutput, event: StepEvent, params: SamplingParams) -> None:
    output.token_ids.append(event.token_id)
    output.text += event.text
    output.finish_reason = event.finish_reason
    if params.logprobs is not None:
        output.logprobs = (output.logprobs or []) + [event.logprob]


def _file_bytes(source) -> int:
    if source.is_dir():
        return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return source.stat().st_size


def _as_batch(value, device) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    if tensor.dim() == 1:
        tensor = tensor[None]
    return tensor.to(device)


def load(model: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu",
         quantize: str | None = None, compile: bool = False, draft: str | os.PathLike | None = None,
         draft_quantize: str | None = None, num_speculative_tokens: int = 3, kv_cache_dtype: str = "auto") -> LLM:
    """Load a built-in model name, a Hugging Face folder, or a .gguf file; quantize: None | "int8" | "int4" | a
    policy name. compile: decode through torch.compile with fused projections (inference only, see
    tinylm/engine/compiled.py). draft: a smaller model with the same tokenizer (or this one with draft_quantize),
    or "[ngram]" (prompt lookup, tinylm/engine/ngram.py), that proposes num_speculative_tokens tokens per step
    for the loaded model to verify (speculative decoding: the same outputs, fewer target passes;
    tinylm/engine/speculative.py). kv_cache_dtype: "auto" (the model's dtype) or "int8" (half the cache memory
    and decode reads, tinylm/engine/kv_pool.py)."""
    pool_dtype(kv_cache_dtype, torch.float32)  # a bad name fails before any weights are read
    if draft is not None:
        check_num_tokens(num_speculative_tokens)  # before any weights are read
    if draft_quantize is not None and (draft is None or draft == NGRAM):
        raise ValueError("draft_quantize quantizes a draft model: give one with draft")
    loaded = load_model(hub.resolve(model), dtype=dtype, device=device, quantize=quantize)
    draft_loaded = draft if draft == NGRAM else None
    if draft is not None and draft != NGRAM:
        draft_loaded = load_model(hub.resolve(draft), dtype=dtype, device=device, quantize=draft_quantize)
        check_draft(loaded.model.config, draft_loaded.model.config)
        _check_same_tokens(loaded.tokenizer, draft_loaded.tokenizer)
    config = EngineConfig(compile=compile, num_speculative_tokens=num_speculative_tokens,
                          kv_cache_dtype=kv_cache_dtype)
    return LLM(loaded, config, draft_loaded)


def _check_same_tokens(target, draft) -> None:
    """A draft with another tokenizer of the same size would be accepted token id by token id, meaninglessly."""
    if target is not None and draft is not None and target.backend.get_vocab() != draft.backend.get_vocab():
        raise ConfigError("the draft model's tokenizer differs from the model's; speculative decoding needs one "
                          "tokenizer")
