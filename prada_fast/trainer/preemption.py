"""Preemption: a scheduler's SIGTERM (or SIGUSR1, its early warning) ends a run at a step
boundary with a checkpoint instead of killing it in the middle of a step.

During the training loop every rank records such a signal (the handler does nothing
else). After each optimizer step the ranks combine their flags in the loop's per-step
all-reduce, so that all of them stop after the same step even when only one got the
signal: DeepSpeed's launcher, signalled itself, terminates its ranks one after another.
The loop then saves a checkpoint and raises `Preempted`; the trainer prints how to resume
and exits with ExitCode.PREEMPTED (common/exits.py).

Under DeepSpeed's launcher each rank also watches the launcher: the `deepspeed` command
does not pass a SIGTERM sent to it alone on to its children (its runner forwards signals
only for multi-node pdsh), so when it dies, or the `deepspeed.launcher.launch` process
under it, the ranks stop the same way instead of training on as orphans."""
from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The ranks agreed to stop after `step`, checkpointed in `checkpoint`."""

    def __init__(self, step: int, max_steps: int, checkpoint, reason: str):
        self.step, self.max_steps, self.checkpoint, self.reason = step, max_steps, checkpoint, reason
        super().__init__(f"{reason}: stopped after step {step} of {max_steps}; checkpoint {checkpoint}")


def _proc_ppid(pid: int) -> int | None:
    """The parent pid of `pid` (Linux /proc), None when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class StopRequest:
    """Context manager: while active, SIGTERM/SIGUSR1 set `reason` instead of ending the
    process, and `requested()` also turns true when the DeepSpeed launcher above this rank
    is gone. The previous handlers come back on exit."""

    def __init__(self):
        self.reason: str | None = None
        self._old: dict = {}
        self._launcher = self._runner = None

    def _handler(self, signum, frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def __enter__(self):
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        ppid = os.getppid()
        if "deepspeed.launcher.launch" in _cmdline(ppid):
            self._launcher = ppid
            runner = _proc_ppid(ppid)
            if runner and "deepspeed" in _cmdline(runner):
                self._runner = runner
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def launcher_gone(self) -> str | None:
        if self._launcher is None:
            return None
        if os.getppid() != self._launcher:
            return "the DeepSpeed launcher process died"
        if self._runner is not None and _proc_ppid(self._launcher) != self._runner:
            return "the deepspeed command died"
        return None

    def requested(self) -> bool:
        """Whether this rank wants to stop (a signal, or its launcher gone)."""
        if self.reason is None:
            self.reason = self.launcher_gone()
        return self.reason is not None
