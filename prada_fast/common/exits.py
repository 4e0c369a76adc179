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


def run_command(parse, run, bad_input: tuple[type[BaseException], ...]) -> int:
    """A command's main: its flags (`parse()`: --help exits 0, a bad flag 2 with its one line
    printed), then `run(args)`; an error of a `bad_input` type is one `error:` line on
    stderr (rank 0 prints it) and exit 2, anything else keeps its traceback."""
    import os
    import sys
    try:
        args = parse()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    try:
        return run(args)
    except bad_input as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
