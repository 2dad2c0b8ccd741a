"""SIGTERM / SIGINT stop a run after the step in progress with a complete checkpoint, the command exits with
128 + the signal, and rerunning the same command resumes exactly; under torchrun both ranks stop at the same step.

The subprocess tests pause the child inside one step (after its backward, before the optimizer step) until the
signal has arrived: the tiny runs take about 10 ms a step, so a test that only watched the log could see the run
finish before its signal landed. The signal itself still goes through the OS to the real handlers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml
from safetensors.torch import load_file

from tinylm.train import checkpoint as ckpt
from tinylm.train import train
from tinylm.train.metrics import read_log
from tinylm.train.preemption import exit_status
from tinylm.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE_S = 120  # generous: only a bug (a hung child) gets near it

# Runs `tinylm <args>` after making rank PAUSE_RANK write MARKER and wait, in step PAUSE_AT, until its stop signal
# has been received (at most DEADLINE_S); other ranks run unchanged. HOOK is where in the step: "_accumulate" (after
# the backward, before the step's all-reduces and optimizer step) or "_after_step" (the step done, before the vote).
_PAUSING_CLI = textwrap.dedent("""
    import os, sys, time
    from tinylm.train.trainer import Trainer

    PAUSE_AT, PAUSE_RANK, MARKER, DEADLINE_S, HOOK = {pause_at}, {pause_rank}, {marker!r}, {deadline}, {hook!r}
    original = getattr(Trainer, HOOK)

    def pausing(self, *args):
        result = original(self, *args)
        step = self.progress.step + (HOOK == "_accumulate")  # _after_step runs once the step is counted
        if step == PAUSE_AT and self.dist.rank == PAUSE_RANK:
            open(MARKER, "w").close()
            end = time.monotonic() + DEADLINE_S
            while not self.stop.requested and time.monotonic() < end:
                time.sleep(0.01)
        return result

    setattr(Trainer, HOOK, pausing)
    {prelude}
    from tinylm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _script(tmp_path, pause_at: int, pause_rank: int = 0, hook: str = "_accumulate", prelude: str = ""):
    marker = tmp_path / "paused"
    path = tmp_path / "pausing_cli.py"
    path.write_text(_PAUSING_CLI.format(pause_at=pause_at, pause_rank=pause_rank, marker=str(marker),
                                        deadline=DEADLINE_S, hook=hook, prelude=prelude))
    return path, marker


def _config_file(tmp_path, config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _start(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _signal_when_paused(proc, marker, sig) -> tuple[str, str]:
    """Wait for the marker (or the child's early death), send `sig`, collect the output; never hangs."""
    end = time.monotonic() + DEADLINE_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    if marker.exists():
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: takes torchrun's workers too
        out, err = proc.communicate()
        pytest.fail(f"the run did not stop within {DEADLINE_S} s of the signal:\n{out[-1500:]}\n{err[-3000:]}")


def _weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_sigterm_saves_exits_143_and_the_same_command_resumes_exactly(tmp_path, h, copy_data):
    config = h.pretrain_config(tmp_path, copy_data, out="preempted", train={"max_steps": 12})
    config_file = _config_file(tmp_path, config)
    script, marker = _script(tmp_path, pause_at=5)
    proc = _start([sys.executable, str(script), "train", "pretrain", str(config_file)])
    out, err = _signal_when_paused(proc, marker, signal.SIGTERM)
    assert proc.returncode == 143 == exit_status("SIGTERM"), err[-3000:]
    # The step in progress (5) was finished, and saved: one complete checkpoint, no half-written folder
    assert [p.name for p in config.out_dir.iterdir() if "checkpoint" in p.name] == ["checkpoint-0000005"]
    assert ckpt.read_state(config.out_dir / "checkpoint-0000005")["step"] == 5
    assert out.strip().splitlines()[-1] == (f"stopped by SIGTERM at step 5: checkpoint {config.out_dir}/"
                                            "checkpoint-0000005; rerun the same command to resume")
    assert err.count("SIGTERM received") == 1
    stopped = [r for r in read_log(config.out_dir / "log.jsonl") if r.get("event") == "stopped"]
    assert [(r["step"], r["signal"]) for r in stopped] == [(5, "SIGTERM")]

    rerun = subprocess.run([sys.executable, "-m", "tinylm.cli", "train", "pretrain", str(config_file)], cwd=REPO,
                           capture_output=True, text=True, timeout=DEADLINE_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = read_log(config.out_dir / "log.jsonl")
    assert [r["step"] for r in log if r.get("event") == "resumed"] == [5]
    assert [r["step"] for r in log if "loss" in r and "event" not in r] == list(range(1, 13))
    straight = train(h.pretrain_config(tmp_path, copy_data, out="straight", train={"max_steps": 12}))
    _assert_same_weights(config.out_dir / "checkpoint-0000012", straight.last_checkpoint)


def test_sigint_twice_exits_130_with_one_checkpoint(tmp_path, h, copy_data):
    """Ctrl-C pressed twice: the second press is ignored while stopping, not a KeyboardInterrupt mid-save."""
    config = h.pretrain_config(tmp_path, copy_data, out="interrupted", train={"max_steps": 12})
    config_file = _config_file(tmp_path, config)
    # the second Ctrl-C arrives while the checkpoint is being written (all files there, not yet renamed)
    second = "import signal; from tinylm.train import checkpoint; " \
             "checkpoint._before_rename = lambda tmp: os.kill(os.getpid(), signal.SIGINT)"
    script, marker = _script(tmp_path, pause_at=3, prelude=second)
    proc = _start([sys.executable, str(script), "train", "pretrain", str(config_file)])
    out, err = _signal_when_paused(proc, marker, signal.SIGINT)
    assert proc.returncode == 130 == exit_status("SIGINT"), err[-3000:]
    assert "KeyboardInterrupt" not in err and err.count("SIGINT received") == 1
    assert [p.name for p in config.out_dir.iterdir() if "checkpoint" in p.name] == ["checkpoint-0000003"]
    assert "stopped by SIGINT at step 3" in out


# --- in process: the trainer's own loop, handlers and their restoration


@pytest.fixture
def sentinel_handlers():
    """Python handlers installed before the run: they must be back afterwards, and never called by the stop."""
    calls = []
    handler = lambda signum, frame: calls.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    yield handler, calls
    for s, old in previous.items():
        signal.signal(s, old)


def _signal_during(monkeypatch, step: int, sig):
    """Send `sig` to this process after step `step`'s backward, before its optimizer step."""
    accumulate = Trainer._accumulate

    def patched(self, batches, count):
        totals = accumulate(self, batches, count)
        if self.progress.step + 1 == step:
            os.kill(os.getpid(), sig)
        return totals

    monkeypatch.setattr(Trainer, "_accumulate", patched)


def test_signal_mid_step_saves_at_the_step_boundary_and_restores_handlers(tmp_path, h, copy_data, monkeypatch,
                                                                          sentinel_handlers):
    handler, calls = sentinel_handlers
    _signal_during(monkeypatch, 5, signal.SIGTERM)
    config = h.pretrain_config(tmp_path, copy_data, out="stopped", train={"max_steps": 12})
    result = train(config)
    assert (result.step, result.stopped_by, len(result.losses)) == (5, "SIGTERM", 5)
    assert result.last_checkpoint == config.out_dir / "checkpoint-0000005"
    assert [p.name for p in ckpt.list_checkpoints(config.out_dir)] == ["checkpoint-0000005"]
    assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGINT) is handler
    assert calls == []  # the run's own handler took the signal

    monkeypatch.undo()
    resumed = train(config)
    straight = train(h.pretrain_config(tmp_path, copy_data, out="straight", train={"max_steps": 12}))
    assert resumed.stopped_by is None and resumed.step == 12
    assert max(abs(a - b) for a, b in zip(result.losses + resumed.losses, straight.losses)) <= 1e-6
    _assert_same_weights(resumed.last_checkpoint, straight.last_checkpoint)


def test_signal_during_a_periodic_save_stops_at_that_checkpoint(tmp_path, h, copy_data, monkeypatch,
                                                                sentinel_handlers):
    """No step after the signal: the checkpoint being written is the one to resume from."""
    monkeypatch.setattr(ckpt, "_before_rename", lambda tmp: os.kill(os.getpid(), signal.SIGTERM))
    config = h.pretrain_config(tmp_path, copy_data, train={"max_steps": 12}, checkpoint={"every_tokens": 4 * 8 * 60})
    result = train(config)
    assert (result.step, result.stopped_by) == (4, "SIGTERM")
    assert [p.name for p in ckpt.list_checkpoints(config.out_dir)] == ["checkpoint-0000004"]


def test_last_step_is_not_a_stop(tmp_path, h, copy_data, monkeypatch, sentinel_handlers):
    """A signal during the final step: the run is complete, so it reports so (exit 0 from the command)."""
    _signal_during(monkeypatch, 6, signal.SIGINT)
    result = train(h.pretrain_config(tmp_path, copy_data, train={"max_steps": 6}))
    assert (result.step, result.stopped_by) == (6, None)


def test_off_the_main_thread_no_handlers_but_request_works(tmp_path, h, copy_data, monkeypatch):
    """signal.signal raises outside the main thread: the trainer skips the handlers; stop.request() still stops."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    accumulate = Trainer._accumulate

    def patched(self, batches, count):
        if self.progress.step + 1 == 3:
            self.stop.request(signal.SIGTERM)
        return accumulate(self, batches, count)

    monkeypatch.setattr(Trainer, "_accumulate", patched)
    results, errors = [], []

    def run():
        try:
            results.append(train(h.pretrain_config(tmp_path, copy_data, train={"max_steps": 12})))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive() and errors == []
    assert (results[0].step, results[0].stopped_by) == (3, "SIGTERM")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# --- torchrun: the signal reaches the ranks at different points; they agree on one step


def test_torchrun_sigterm_both_ranks_stop_at_the_same_step(tmp_path, h, copy_data):
    config = h.pretrain_config(tmp_path, copy_data, out="ddp", train={"max_steps": 12, "micro_batch_size": 2})
    config_file = _config_file(tmp_path, config)
    # Rank 1 waits for its signal after step 4, before its stop vote; rank 0 has cast its "no stop" vote for step 4
    # by then (and waits for rank 1's in the all-reduce, where the signal finds it): only rank 1's vote carries the
    # signal, and both must stop after step 4 (without the vote rank 0 would be in step 5 while rank 1 saves).
    script, marker = _script(tmp_path, pause_at=4, pause_rank=1, hook="_after_step")
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(script), "train", "pretrain", str(config_file)])
    try:
        out, err = _signal_when_paused(proc, marker, signal.SIGTERM)
    finally:
        assert subprocess.run(["pgrep", "-f", str(script)], capture_output=True).stdout == b""  # no orphans
    assert marker.exists(), err[-3000:]
    # torchrun answers its own SIGTERM with an error status (its workers ended cleanly, 143 each)
    assert proc.returncode != 0
    assert [p.name for p in config.out_dir.iterdir() if "checkpoint" in p.name] == ["checkpoint-0000004"]
    state = ckpt.read_state(config.out_dir / "checkpoint-0000004")
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng"]) == 2  # both ranks took part
    assert out.count("stopped by SIGTERM at step 4") == 1  # printed by rank 0 only
    stopped = [r for r in read_log(config.out_dir / "log.jsonl") if r.get("event") == "stopped"]
    assert [(r["step"], r["signal"]) for r in stopped] == [(4, "SIGTERM")]
