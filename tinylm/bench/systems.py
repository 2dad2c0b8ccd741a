"""The systems `tinylm bench` times: tinylm itself and the references (transformers, llama.cpp), each behind the
same three calls: warm(prompts), run(prompts, new_tokens) -> Stamps, close().

References are test and benchmark tools, never runtime dependencies: each is imported only when asked for.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from tinylm.bench.timing import Stamps, stream_stamps, transformers_stamps
from tinylm.quant.memory import trim

WARM_TOKENS = 4  # a short run per batch size before timing: allocator, kernels' first calls, compiled shapes


class TinyLMSystem:
    def __init__(self, llm, name: str = "tinylm", label: str = "", schema: dict | None = None) -> None:
        self.llm, self.name, self.label = llm, name, label
        self.schema = schema  # --json-schema: every reply constrained to it

    def skip_reason(self, batch: int) -> str | None:
        return None

    def warm(self, prompts: list[list[int]]) -> None:
        self.llm.engine.warmup()  # compiles the decode graphs (with --compile; cached on disk)
        self.llm.generate(prompts, _greedy(WARM_TOKENS, self.schema))

    def run(self, prompts: list[list[int]], new_tokens: int) -> Stamps:
        # Every run computes its prompts, as the references do: warm-up and earlier runs used the same prompts, and
        # a prefix-cache hit would time a lookup instead of a prefill (it made batch 16's prefill look 4x faster)
        self.llm.engine.blocks.reset_prefix_cache()
        return stream_stamps(self.llm, prompts, _greedy(new_tokens, self.schema))

    def close(self) -> None:
        self.llm = None
        _release()


class TransformersSystem:
    name = "transformers"

    def __init__(self, source: Path, dtype: str, device: str = "cpu") -> None:
        self.model = load_transformers(source, dtype, device)
        self.label = f"{dtype}, eager, {'GGUF dequantized' if source.suffix == '.gguf' else 'same folder'}"

    def skip_reason(self, batch: int) -> str | None:
        return None

    def warm(self, prompts: list[list[int]]) -> None:
        transformers_stamps(self.model, prompts, WARM_TOKENS)

    def run(self, prompts: list[list[int]], new_tokens: int) -> Stamps:
        return transformers_stamps(self.model, prompts, new_tokens)

    def close(self) -> None:
        self.model = None
        _release()


class LlamaCppSystem:
    """llama.cpp through llama-cpp-python, greedy, one sequence: its high-level API does not batch prompts."""

    def __init__(self, gguf: Path, name: str, label: str, context: int, grammar=None) -> None:
        from llama_cpp import Llama

        self.name, self.label = name, label
        self.grammar = grammar  # --json-schema: llama.cpp's GBNF of it
        self.llama = Llama(model_path=str(gguf), n_ctx=context, n_threads=torch.get_num_threads(), verbose=False)

    def skip_reason(self, batch: int) -> str | None:
        return None if batch == 1 else "llama-cpp-python generates one sequence at a time"

    def warm(self, prompts: list[list[int]]) -> None:
        self.run(prompts, WARM_TOKENS)

    def run(self, prompts: list[list[int]], new_tokens: int) -> Stamps:
        self.llama.reset()  # else generate() reuses the cached prompt and skips its prefill
        times, ids = [], []
        start = time.perf_counter()
        constrained = {} if self.grammar is None else {"grammar": self.grammar}
        for token in self.llama.generate(prompts[0], top_k=1, temp=0.0, **constrained):  # EOS is ignored
            times.append(time.perf_counter())
            ids.append(token)
            if len(times) == new_tokens:
                break
        return Stamps(start, [times], [ids])

    def close(self) -> None:
        self.llama.close()
        self.llama = None
        _release()


def load_transformers(source: Path, dtype: str, device: str = "cpu"):
    """transformers' model of the same weights on `device`: a folder in `dtype`; a GGUF file through transformers'
    own GGUF loader, which dequantizes to float32 (then cast, so both sides compute in `dtype`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # its notes (fast-path kernels not installed, ...) would break up the table
    if source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype))
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def _greedy(new_tokens: int, schema: dict | None = None):
    import tinylm
    from tinylm.sampling_params import StructuredOutputsParams

    structured = None if schema is None else StructuredOutputsParams(json=schema)
    return tinylm.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                                 structured_outputs=structured)


def _release() -> None:
    """Give a closed system's memory back, so that the next one's peak resident memory is its own."""
    gc.collect()
    trim()
