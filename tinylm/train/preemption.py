"""Graceful stop on SIGTERM / SIGINT: the trainer finishes the step in progress, saves a checkpoint and returns.

SIGTERM is what SLURM and Kubernetes send before SIGKILL on preemption (and what torchrun forwards to its workers);
SIGINT is Ctrl-C. The handler only records the signal; the trainer polls it once per step (agreed over processes,
so every rank stops after the same step and they save one checkpoint together). A second signal while stopping is
ignored: the checkpoint write must finish (it is atomic anyway, so a SIGKILL still leaves the previous one).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signal_name: str) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for SIGINT (as `tinylm` already answers Ctrl-C elsewhere).

    Not 0: a preempted run has not finished, and 0 would tell the scheduler it had (a Kubernetes Job would
    complete instead of restarting the pod, a SLURM `afterok` dependency would start, torchrun would report
    success). 128 + N is what a shell or container runtime reports for a process killed by signal N, so
    tooling that already treats 143 as "preempted" (e.g. a Kubernetes podFailurePolicy on exit code 143) keeps
    working, while the checkpoint was written cleanly.
    """
    return 128 + signal.Signals[signal_name].value


class StopSignals:
    """Records the first stop signal; `handlers()` installs the recording handlers for the span of a run."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce  # one line on stderr when the signal arrives (main process only)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the run to stop after the step in progress (what the handler does; callable from any thread)."""
        if self.signum is not None:
            return  # already stopping: a repeated signal must not interrupt the checkpoint write
        self.signum = signum
        if self.announce:
            # os.write, not print: a handler that prints can hit "reentrant call" inside an interrupted print
            name = signal.Signals(signum).name
            os.write(2, f"tinylm: {name} received: finishing the step in progress, then saving a checkpoint "
                        "(further signals are ignored until it is written)\n".encode())

    def _handle(self, signum: int, frame) -> None:
        self.request(signum)

    @contextmanager
    def handlers(self) -> Iterator[StopSignals]:
        """Install the handlers, restoring the previous ones on exit (library callers keep theirs).

        Outside the main thread signal.signal raises: then nothing is installed (request() still works).
        A signal the process was started with ignored (nohup, `cmd &` in a script) stays ignored.
        """
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) != signal.SIG_IGN:
                    previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                # None: a handler installed outside Python, which cannot be put back; the default is closest
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None
