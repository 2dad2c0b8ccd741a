"""SamplingParams: vLLM's names and meanings, validated on construction with one clear message per problem.

This is the one place the Python API, the CLI and the HTTP server check sampling values, so every float must be
finite and every integer within the range the engine can honour. What needs the model (token ids inside the
vocabulary, the context length) is checked by the engine (tinylm/engine/engine.py, check_input).
"""

from __future__ import annotations

import functools
import json as json_lib
import math
import warnings
from dataclasses import dataclass, field, fields, replace

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_N = 16  # completions per prompt, as the HTTP server allows
MAX_LOGIT_BIAS = 100.0  # OpenAI's and vLLM's bound on a logit_bias value
# Positive temperatures below this are raised to it, as vLLM does (its _MAX_TEMP): logits / 1e-45 overflow float32
# to inf and softmax(inf - inf) is NaN (six end-of-text tokens and empty text, before this clamp).
MIN_TEMPERATURE = 0.01
# torch.Generator.manual_seed takes seeds in [-2**63, 2**64 - 1] ("Overflow when unpacking long long" beyond)
MIN_SEED, MAX_SEED = -(2 ** 63), 2 ** 64 - 1


MAX_CHOICES = 1024  # choice= alternatives
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar's source (the HTTP server's body limit is tighter)


@dataclass
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one constraint on the text a request generates.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: a regular expression the
    whole output matches; choice: one of these strings; grammar: a context-free grammar in Lark/EBNF syntax (or
    llama.cpp's GBNF, recognised by its `::=`). whitespace_pattern: a regex for the whitespace JSON may hold
    between tokens (default: none but one space after `,` and `:`, which keeps small models from looping on
    newlines). Validity against the tokenizer is checked when the engine compiles the constraint.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        _check(len(given) == 1, "structured outputs take exactly one of json, regex, choice, grammar or "
                                f"json_object, got {', '.join(given) or 'none'}")
        _check(self.json is None or isinstance(self.json, (dict, str)),
               f"json must be a JSON schema (an object or its text), got {type(self.json).__name__}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value), f"{name} must be a non-empty string")
        _check(self.choice is None or (isinstance(self.choice, list) and 0 < len(self.choice) <= MAX_CHOICES
                                       and all(isinstance(c, str) and c for c in self.choice)),
               f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        _check(len(self.key) <= MAX_GRAMMAR_CHARS, f"the constraint is over {MAX_GRAMMAR_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, name) not in (None, False))

    @functools.cached_property
    def key(self) -> str:
        """A canonical text of the constraint: compiled grammars are cached under it (computed once: a request's
        schema is looked up on the event loop, per choice, and may be a megabyte)."""
        value = getattr(self, self.kind)
        return json_lib.dumps([self.kind, value, self.whitespace_pattern], sort_keys=True)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before 0.10.2


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy; (0, MIN_TEMPERATURE) is raised to MIN_TEMPERATURE
    top_p: float = 1.0  # in (0, 1]
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0  # in [0, 1]
    repetition_penalty: float = 1.0  # > 0; 1 is off (applies to prompt and output tokens, as in vLLM)
    presence_penalty: float = 0.0  # in [-2, 2], output tokens only
    frequency_penalty: float = 0.0  # in [-2, 2], output tokens only
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # in [MIN_SEED, MAX_SEED]
    logprobs: int | None = None  # None: none; N: the chosen token's logprob plus the top-N alternatives
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Fields added for vLLM's call shapes; appended so that positional construction keeps its meaning
    n: int = 1  # completions per prompt (LLM.generate / chat; the server passes its own n)
    best_of: int | None = None  # vLLM's; only None or == n (tinylm does not rank extra candidates)
    min_tokens: int = 0  # EOS and stop_token_ids are masked, and stop strings ignored, until this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit before sampling
    prompt_logprobs: int | None = None  # None: none; N: each prompt token's logprob plus the top-N alternatives
    spaces_between_special_tokens: bool = True  # vLLM's; only True (tinylm's decoder does not add the spaces)
    # Output constrained to a JSON schema, regex, choice or grammar (tinylm/engine/structured.py compiles it)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_lengths()
        self._check_floats()
        self._check_integers()
        self._check_logit_bias()
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs must be a StructuredOutputsParams (json=, regex=, choice=, grammar= or "
               f"json_object=True), got {type(self.structured_outputs).__name__}")
        _check(self.spaces_between_special_tokens is True,
               "spaces_between_special_tokens=False is not supported (tinylm decodes special tokens without "
               "added spaces either way)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            _warn(f"temperature {self.temperature:g} is below {MIN_TEMPERATURE} and is raised to it (as vLLM "
                       "does): smaller values overflow the logits; use 0 for greedy decoding")
            self.temperature = MIN_TEMPERATURE

    def _check_lengths(self) -> None:
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _check(self.best_of is None or self.best_of == self.n,
               f"best_of is not supported (only best_of == n), got best_of={self.best_of!r} and n={self.n}")

    def _check_floats(self) -> None:
        """Every float field is a finite number in its range (inf and NaN are refused, whatever the range)."""
        _check(_is_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0 and finite, got {self.temperature!r}")
        _check(_is_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")

    def _check_integers(self) -> None:
        _check(_is_int(self.top_k) and self.top_k >= -1,
               f"top_k must be -1 (disabled) or a non-negative integer, got {self.top_k!r}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers")
        _check(self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED),
               f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                   f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    def _check_logit_bias(self) -> None:
        """Keys: token ids (their upper bound, the vocabulary, is the engine's check); values: finite, in
        [-100, 100] as OpenAI and vLLM bound them."""
        if not self.logit_bias:
            self.logit_bias = None
            return
        _check(isinstance(self.logit_bias, dict), f"logit_bias must be a dict of token id -> bias, got "
                                                  f"{type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            _check(_is_int(token) and token >= 0, f"logit_bias keys must be non-negative token ids, got {token!r}")
            _check(_is_finite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                   f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any repetition / presence / frequency penalty changes the logits."""
        return self.repetition_penalty != 1 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def for_choice(self, index: int) -> SamplingParams:
        """The params of completion `index` of n: a seeded request gives choice i the seed seed + i (as the
        server does), wrapped into the seed range so that a seed near 2**64 - 1 still has n valid successors."""
        if self.seed is None or index == 0:
            return self
        seed = self.seed + index
        return replace(self, seed=seed - 2 ** 64 if seed > MAX_SEED else seed)


_FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))
# vLLM arguments tinylm does not implement, with what to do instead (the rest of unknown names: a typo)
_UNSUPPORTED = {
    "bad_words": "mask the tokens with logit_bias={id: -100}",
    "allowed_token_ids": "mask the other tokens with logit_bias",
    "logits_processors": "", "truncate_prompt_tokens": "",
    "output_kind": "", "detokenize": "", "use_beam_search": "", "length_penalty": "", "early_stopping": "",
}


def _refuse_unknown_arguments(init):
    """The dataclass __init__, with a message that names unknown arguments instead of Python's bare TypeError."""
    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        if "guided_decoding" in kwargs and "structured_outputs" not in kwargs:  # vLLM's name before 0.10.2
            kwargs["structured_outputs"] = kwargs.pop("guided_decoding")
        unknown = sorted(set(kwargs) - _FIELD_NAMES)
        if unknown:
            hints = "".join(f"; {name}: {_UNSUPPORTED[name]}" for name in unknown if _UNSUPPORTED.get(name))
            raise TypeError(f"SamplingParams got unsupported arguments {', '.join(unknown)}{hints}. Accepted: "
                            f"{', '.join(sorted(_FIELD_NAMES))}")
        init(self, *args, **kwargs)
    return checked


SamplingParams.__init__ = _refuse_unknown_arguments(SamplingParams.__init__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A real number, not a bool, not NaN nor +-inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)  # Python's default filter shows it once per calling line
