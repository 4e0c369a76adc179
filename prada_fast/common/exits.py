"""The exit codes of every command (README, "When things go wrong")."""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0              # done (also after --stop-after)
    FAILED = 1          # compare: nothing to report, or a trainer run failed (its log is named)
    BAD_INPUT = 2       # a flag, a file, the data: one `error:` line names it, nothing written
    BAD_NUMERICS = 3    # --max-bad-steps non-finite steps in a row (a checkpoint of the last good state)
    RANK_FAILED = 4     # a rank died or hung
    PREEMPTED = 5       # SIGTERM / SIGUSR1: a checkpoint was saved, rerun with --resume
    SAVE_FAILED = 6     # a checkpoint could not be written; the previous one is still latest
    INTERRUPTED = 130   # compare: Ctrl-C (finished runs are kept: rerun the same command)
