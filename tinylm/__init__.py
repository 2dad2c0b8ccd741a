"""tinylm: a fast, hackable engine for small causal language models."""

from tinylm.config import ModelConfig
from tinylm.engine.lora import LoRARequest
from tinylm.errors import ConfigError, ContextLengthError, TemplateError, TinyLMError, WeightsError
from tinylm.llm import LLM, CompletionOutput, Logprob, RequestOutput, load
from tinylm.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM", "ModelConfig", "RequestOutput", "CompletionOutput", "Logprob", "SamplingParams", "StructuredOutputsParams",
    "LoRARequest", "load",
    "TinyLMError", "ConfigError", "WeightsError", "TemplateError", "ContextLengthError",
]
__version__ = "0.1.0"
