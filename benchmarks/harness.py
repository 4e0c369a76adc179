"""The suite's plumbing: the device, the case lists (CPU and GPU), running one case in a
fresh subprocess, and replaying the times measured there into pytest-benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.cases import Case, rows_case

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"


def bench_device() -> str:
    """PRADA_BENCH_DEVICE (cpu | cuda), else cuda where available, else cpu."""
    dev = os.environ.get("PRADA_BENCH_DEVICE")
    if dev:
        return dev
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = bench_device()
ON_GPU = DEVICE.startswith("cuda")

# ----------------------------------------------------------------------------- parity cases
# Small and odd: N, V, H not multiples of any block, ignored rows, a pooling mask, a bias,
# tau != 1, bf16, a batch whose every target is ignored (domain term only), packed rows
# (seq_index: one sequence in a row, many short ones, -1 positions, an empty pool), and the
# teacher as top-K log-probabilities (a cached teacher).
PARITY_CASES = [
    Case(B=2, T=37, H=48, V=1001, Ht=40, bias=True, ignore_frac=0.25, pool_mask=True, tau=2.0,
         alpha=0.3, lam=0.7, seed=1),
    Case(B=2, T=48, H=64, V=3001, Ht=96, ignore_frac=0.1, tau=2.0, alpha=0.5, seed=2),
    Case(B=3, T=29, H=72, V=2003, Ht=0, ignore_frac=0.2, seed=3),                     # no teacher
    Case(B=2, T=33, H=64, V=2003, Ht=48, dtype="bfloat16", ignore_frac=0.2, seed=4),
    Case(B=2, T=17, H=32, V=517, Ht=24, ignore_frac=1.0, pool_mask=True, seed=5),     # all ignored
    Case(B=4, T=23, H=40, V=1003, Ht=32, D=5, bias=True, ignore_frac=0.3, pool_mask=True, packed=True,
         tau=2.0, alpha=0.4, seed=6),                                                   # packed rows
    Case(B=3, T=19, H=56, V=1501, topk=37, bias=True, ignore_frac=0.2, pool_mask=True, tau=2.0,
         alpha=0.4, seed=7),                                                            # top-K teacher
]
PARITY_IMPLS = ["reference", "reference_compiled", "chunked", "triton", "liger_jsd_chunked",
                "liger_jsd", "liger_flce", "cce"]

# ----------------------------------------------------------------------------- speed cases
# CPU (fp32, 2 cores: the whole suite in < 10 minutes): a vocabulary sweep at N = 512 for the
# plots, and the kernels issue's target case N = 4096, H = 512, V = 32000, H_t = 512.
CPU_TARGET = rows_case(4096, 512, 32000, 512)
CPU_SWEEP = [rows_case(512, 512, V, 512) for V in (8000, 32000, 64000)]
# every implementation is listed: those that cannot run here are skipped with the reason
CPU_IMPLS = ["reference", "reference_compiled", "chunked", "triton", "liger_jsd_chunked",
             "liger_jsd", "liger_flce", "cce"]

# GPU (bf16): vocabularies of Llama-2 (32000), Llama-3 (128256) and Qwen2.5 (151936) at
# H = 2048 and 4096 (teacher of the same width), N = 8192; and N = 4096 / 16384 at 128256.
GPU_CASES = [rows_case(8192, H, V, H, "bfloat16") for H in (2048, 4096) for V in (32000, 128256, 151936)]
GPU_CASES += [rows_case(N, 4096, 128256, 4096, "bfloat16") for N in (4096, 16384)]
GPU_IMPLS = ["reference", "reference_compiled", "chunked", "triton", "liger_jsd_chunked",
             "liger_jsd", "liger_flce", "cce"]


def speed_cases() -> list[Case]:
    return GPU_CASES if ON_GPU else CPU_SWEEP + [CPU_TARGET]


def heavy(case: Case) -> bool:
    """A case that `pytest benchmarks/` runs only with --bench-full (marker `heavy`): on a CPU
    the kernels issue's target (N = 4096: ~40 % of the suite's time, several minutes on a
    slow 2-core machine), so that the default run stays within 10 minutes there."""
    return not ON_GPU and case.id == CPU_TARGET.id


def speed_impls() -> list[str]:
    return GPU_IMPLS if ON_GPU else CPU_IMPLS


def family(case: Case) -> str:
    """Cases that differ only in V: one line per implementation in the plots."""
    return f"N{case.N}-H{case.H}-Ht{case.Ht}-{case.dtype}"


# ----------------------------------------------------------------------------- training step
# CPU: the 'tiny' student and 'tiny-teacher' presets with a 32000-id vocabulary (the byte
# vocabulary of 259 ids makes the loss negligible); GPU: a Qwen2.5-0.5B-shaped student and a
# 1.5B-shaped teacher (vocabulary 151936), random weights from their configs.
CPU_TRAIN = dict(student="tiny", teacher="tiny-teacher", vocab=32000, batch=8, seq=256,
                 warmup=2, steps=3)
GPU_TRAIN = dict(student="qwen2.5-0.5b", teacher="qwen2.5-1.5b", vocab=0, batch=4, seq=1024,
                 warmup=2, steps=5)


def train_config() -> dict:
    return GPU_TRAIN if ON_GPU else CPU_TRAIN


def train_impls() -> list[str]:
    return ["reference", "chunked", "triton"] if ON_GPU else ["reference", "chunked"]


# ----------------------------------------------------------------------------- subprocesses
class CaseFailed(AssertionError):
    pass


def child_env(interpret_triton: bool = False, extra: dict | None = None) -> dict:
    """The environment of a benchmark subprocess: the repository importable, a world of its
    own (no inherited rank or port: a parent's port may be taken), TRITON_INTERPRET only when
    asked (parity of the Triton implementations on a CPU), then `extra`."""
    env = dict(os.environ)
    for k in ("TRITON_INTERPRET", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    if interpret_triton:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def run_module(module: str, args: list[str], *, env: dict | None = None, timeout: float = 1800,
               interpret_triton: bool = False) -> dict:
    """`python -m module *args --json TMP` in a fresh process from the repository root;
    returns the JSON it wrote (environment: child_env)."""
    full_env = child_env(interpret_triton, env)
    with tempfile.TemporaryDirectory(prefix="prada-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *args, "--json", str(out)]
        rc, stdout, stderr = run_group(cmd, env=full_env, timeout=timeout)
        if rc != 0 and out.exists():  # a tool that writes as it goes (max_batch) keeps its trials
            partial = json.loads(out.read_text())
            if partial.get("complete") is False:
                partial["cut_short"] = "timeout" if rc is None else f"exit {rc}: {stderr[-500:]}"
                return partial
        if rc is None:
            raise CaseFailed(f"{' '.join(cmd)}: no result after {timeout:.0f} s\n{stderr[-3000:]}")
        if rc != 0 or not out.exists():
            why = " (killed: out of memory?)" if rc in (-9, 137) else ""
            raise CaseFailed(f"{' '.join(cmd)} exited {rc}{why}\n{stdout[-3000:]}\n{stderr[-6000:]}")
        return json.loads(out.read_text())


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL when the parent dies, so that a killed run
    leaves no orphan holding the GPU (the child has its own session, out of the parent's group)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass


def run_group(cmd: list[str], *, env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run cmd from the repository root in its own process group; on timeout kill the whole
    group (its own subprocesses too, which may hold GPU memory) and return rc None."""
    import signal

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr


# ----------------------------------------------------------------------------- pytest-benchmark
# The times are measured in the subprocess; a replay clock hands them to pytest-benchmark, so
# that its statistics, tables and --benchmark-json are those of the measured calls (not of
# the subprocess's start-up). Used through @pytest.mark.benchmark(timer=replay_timer).
_CLOCK = {"now": 0.0, "queue": []}


def replay_timer() -> float:
    return _CLOCK["now"]


def _advance() -> None:
    if _CLOCK["queue"]:
        _CLOCK["now"] += _CLOCK["queue"].pop(0)


def record(benchmark, times: list[float], group: str, extra: dict) -> None:
    """Store `times` (seconds per call) and `extra` in the benchmark fixture."""
    benchmark.group = group
    benchmark.extra_info.update(extra)
    _CLOCK["queue"] = list(times)
    benchmark.pedantic(_advance, rounds=max(1, len(times)), iterations=1, warmup_rounds=0)
    _CLOCK["queue"] = []
