"""Process-group set-up for the deepspeed launcher, torchrun and plain python: gloo on the
CPU, nccl on CUDA; helpers that are no-ops without a process group."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    start_time: float = field(default_factory=time.time)


def free_port() -> int:
    """A TCP port that is free on this host now (MASTER_PORT, the launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(script, nproc: int = 1) -> list[str]:
    """The command line that runs `script` in `nproc` processes: this python for one, else the
    deepspeed launcher installed next to it, with --num_gpus nproc on a free port."""
    if nproc == 1:
        return [sys.executable, str(script)]
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [ds, "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script)]


def setup(timeout_min: float) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed. One process without a launcher gets
    the environment of a world of one."""
    import deepspeed
    alone = "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # we pick the port
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # ranks on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's launcher's LOCAL_SIZE (not
    # WORLD_SIZE, which counts every node's)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE",
                                                                         os.environ.get("WORLD_SIZE", 1))))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ or local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    for attempt in range(3):
        if dist.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=timedelta(minutes=timeout_min))
        except dist.DistNetworkError:
            # a world of one on a port we chose, taken by another process since: choose again
            if not alone or attempt == 2:
                raise
            os.environ["MASTER_PORT"] = str(free_port())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wait_for_rank0(key: str, value=None, poll_s: float = 0.5):
    """Rank 0 publishes `value` under `key`; the other ranks wait for it without a
    collective, so that rank-0-only work (teacher fit, evaluation) may take longer than the
    process-group timeout, and a rank 0 that dies ends the wait with an error at once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    import pickle

    store = dist.distributed_c10d._get_default_store()
    key = f"prada/{key}"
    if dist.get_rank() == 0:
        store.set(key, pickle.dumps(value))
        return value
    while True:
        try:
            if store.check([key]):
                return pickle.loads(store.get(key))
        except RuntimeError as e:  # the store lives in rank 0's process
            raise RankFailure(f"lost rank 0 while waiting for {key!r}: {e}") from e
        time.sleep(poll_s)


class RankFailure(RuntimeError):
    """Another rank of the job died or stopped answering."""


DistError = getattr(dist, "DistError", RuntimeError)
_PEER_HINTS = ("Connection reset by peer", "Connection closed by peer", "timed out", "Timeout",
               "Broken pipe", "NCCL communicator was aborted", "DistNetworkError")


def register_pid() -> None:
    """Record host and pid of every rank in the store, to name a rank that dies."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"prada/pid/{dist.get_rank()}", f"{socket.gethostname()}:{os.getpid()}")


def rank_pids() -> dict[str, int]:
    """{rank: pid} of every rank (as registered by register_pid; this process alone otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"0": os.getpid()}
    store = dist.distributed_c10d._get_default_store()
    return {str(r): int(store.get(f"prada/pid/{r}").decode().rsplit(":", 1)[1])
            for r in range(dist.get_world_size())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child stays a zombie until its launcher reaps it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _dead_ranks() -> list[str]:
    """Ranks on this host whose process is gone (others: unknown from here)."""
    dead = []
    try:
        store = dist.distributed_c10d._get_default_store()
        for r in range(dist.get_world_size()):
            host, pid = store.get(f"prada/pid/{r}").decode().rsplit(":", 1)
            if host == socket.gethostname() and not _alive(int(pid)):
                dead.append(f"rank {r} (pid {pid})")
    except Exception:  # the store itself may be gone with rank 0
        pass
    return dead


def raise_if_peer_failed(err: BaseException, where: str) -> None:
    """Turn a collective that failed because a peer died or hung into a RankFailure whose
    message names the dead rank where it can tell."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    text = str(err)
    if not any(h in text for h in _PEER_HINTS):
        return
    deadline = time.time() + 3.0  # the peer's socket closes a moment before it is gone
    dead = _dead_ranks()
    while not dead and time.time() < deadline:
        time.sleep(0.2)
        dead = _dead_ranks()
    who = ", ".join(dead) + " died" if dead else "a peer rank died or stopped answering"
    raise RankFailure(f"{where}: {who} ({text.splitlines()[0][:160]}). Restart the job with "
                      "--resume to continue from the last checkpoint") from err


def _collective_device(device=None):
    """Where a collective's tensor must live: CUDA under NCCL, else `device` or the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device or "cpu"


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank (collective: every rank
    calls it); [obj] without a process group."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (collective: every rank calls it)."""
    return all_mean([float(flag)], None)[0] > 0


def all_mean(values: list[float], device) -> list[float]:
    """Element-wise mean over ranks of a short list of floats."""
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return t.tolist()


def zero3_partition_stats(module) -> dict:
    """How ZeRO-3 split `module`'s parameters: full element count, the elements each rank
    holds, and how many tensors are partitioned (the rest persist whole on every rank)."""
    full = local = parted = 0
    params = list(module.parameters())
    for p in params:
        if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
            full += p.ds_numel
            local += p.ds_tensor.numel()
            parted += int(p.ds_tensor.numel() < p.ds_numel)
        elif hasattr(p, "ds_numel"):  # persistent: below the threshold, kept whole everywhere
            full += p.ds_numel
            local += p.ds_numel
        else:
            full += p.numel()
            local += p.numel()
    per_rank = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, local)
    return {"full_numel": full, "local_numel": per_rank, "tensors": len(params),
            "partitioned_tensors": parted}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on `n` intra-op threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def all_threads():
    """Use every core while only this rank works (teacher fit, evaluation on rank 0)."""
    return torch_threads(os.cpu_count() or torch.get_num_threads())


def shm_buffer(rank: int, shm_dir: str | Path = "/dev/shm") -> Path:
    """The shared-memory all-reduce buffer that DeepSpeed's CPU communication op creates for
    this rank (about 69 MB, named by user, master address and port, and rank) and never
    unlinks: in RAM until the machine reboots, one per rank of every run."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path(shm_dir) / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def teardown(shm_dir: str | Path = "/dev/shm") -> None:
    """Destroy the process group (without it, ranks abort at exit on the CPU backend),
    through DeepSpeed when it is loaded, so that it also drops the groups it cached (a
    later run in the same process then starts clean); then remove this rank's DeepSpeed
    shared-memory buffer (`shm_buffer`; peers that mapped it keep their mapping)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
        with contextlib.suppress(OSError):
            shm_buffer(rank, shm_dir).unlink(missing_ok=True)
