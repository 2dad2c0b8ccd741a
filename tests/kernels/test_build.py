"""Building tinylm's kernels: a failed build falls back with one warning, the version follows the sources (it keys
Inductor's cache), and a lock left by a killed build does not hang the next one."""

from __future__ import annotations

import pytest

from tinylm import kernels


def test_build_failure_warns_and_reports_unavailable(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "_STATE", {})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert kernels.available() is False


def test_version_follows_the_sources(monkeypatch, tmp_path):
    """Compiled graphs are cached under the kernels' version (tinylm/engine/compiled.py): a changed source must
    give another one, or a graph built for the old kernel would be reused."""
    source = tmp_path / "kernel.cpp"
    source.write_text("// one")
    monkeypatch.setattr(kernels, "SOURCES", [source])
    first = kernels.version()
    source.write_text("// two")
    assert kernels.version() != first


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(monkeypatch, tmp_path):
    import os
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    kernels._clear_stale_lock("any")
    assert lock.exists()  # a build may be running: fresh locks stay
    os.utime(lock, (0, 0))
    kernels._clear_stale_lock("any")
    assert not lock.exists()
