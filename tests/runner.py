"""Running prada_fast/train.py as a user would: a subprocess, one process or the deepspeed
launcher with N ranks on the CPU."""
import json
import math
import os
import subprocess
from pathlib import Path

from prada_fast.common.distributed import launch_cmd

REPO = Path(__file__).resolve().parents[1]
# Small and quick: tiny synthetic data, short generations, a metrics line every step.
FAST = ["--data", "synthetic:48", "--eval-per-domain", "4", "--max-new-tokens", "8",
        "--no-progress", "--log-every", "1", "--max-len", "128"]
# The auto teacher of the runs that fit one: the same data (FAST without held-out records),
# steps and seed, so the session's teacher cache fits it once for all of them.
FIT = ["--eval-per-domain", "0", "--teacher-steps", "10", "--seed", "2"]


def train_cmd(args, nproc=1) -> list[str]:
    return [*launch_cmd("prada_fast/train.py", nproc), *args]


def train_env(cache) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PRADA_FAST_CACHE": str(cache)}


def train(args, cache, nproc=1, check=True, timeout=900):
    cmd = train_cmd(args, nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(cache), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    if check and nproc > 1:  # every rank removed DeepSpeed's shared-memory buffer (69 MB each)
        port = cmd[cmd.index("--master_port") + 1]
        left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert not left, f"{cmd} left {[p.name for p in left]} in /dev/shm"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_metrics(ra: dict, rb: dict, keys) -> bool:
    """Two metrics.jsonl rows equal in `keys` to one fp32 rounding step: the file prints 6
    decimals, and a loss near 7 is a float32 with an ulp of 5e-7, so two identical runs were
    seen to print 7.363482 and 7.363483 (one uninterrupted run, from one invocation of a test
    to the next)."""
    return all(math.isclose(ra[k], rb[k], rel_tol=1e-6, abs_tol=1e-6) for k in keys)


def assert_same_losses(a: list[dict], b: list[dict], steps: int, keys) -> None:
    """Runs a and b logged steps 1..steps with the same metrics (same_metrics)."""
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        assert same_metrics(ra, rb, keys), (ra, rb)
