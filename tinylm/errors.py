"""Errors tinylm raises for bad input. The CLI prints them as one line, never a traceback."""


class TinyLMError(Exception):
    """Base of every error caused by the user's input (files, configs, prompts, parameters)."""


class ConfigError(TinyLMError, ValueError):
    """A config.json or GGUF metadata that tinylm cannot run: unknown architecture, inconsistent sizes."""


class WeightsError(TinyLMError, ValueError):
    """A weight file that is corrupt, truncated, or does not fit the config."""


class TemplateError(TinyLMError, ValueError):
    """A chat template that fails to render or tries to escape the sandbox."""


class ContextLengthError(TinyLMError, ValueError):
    """A sequence longer than the model's context."""


class ModelNotFoundError(TinyLMError, FileNotFoundError):
    """A model name or path that is neither cached, local, nor fetchable."""
