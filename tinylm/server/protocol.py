"""Request bodies of the OpenAI and TGI routes (pydantic), and their translation to SamplingParams.

Pydantic checks types; the meaning of each value (ranges, limits) is checked once, by SamplingParams, so the
Python API, the CLI and both HTTP dialects refuse the same inputs with the same messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tinylm.sampling_params import SamplingParams

MAX_N = 16  # completions per request (n)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields tinylm does not use (user, metadata, ...)


class StreamOptions(_Request):
    include_usage: bool = False


class _OpenAISampling(_Request):
    """The sampling fields both OpenAI routes share, plus vLLM's extensions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return SamplingParams(
            max_tokens=max_tokens, temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
            top_k=_default(self.top_k, -1), min_p=_default(self.min_p, 0.0), stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], seed=self.seed, logprobs=logprobs,
            presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_params(self) -> SamplingParams:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        max_tokens = _default(self.max_tokens, 16)
        if max_tokens == 0 and self.echo:
            max_tokens = 1  # scoring only: one token is generated and dropped from the answer
        return self.sampling_params(max_tokens, self.logprobs)


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as a chat template sees it (text parts of multi-part content joined)."""
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def to_params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        max_tokens = _default(self.max_completion_tokens, _default(self.max_tokens, default_max_tokens))
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class TGIParameters(_Request):
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False


class TGIRequest(_Request):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


def _default(value, default):
    return default if value is None else value


ErrorDialect = Literal["openai", "tgi"]
