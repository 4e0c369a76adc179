"""Process-group set-up for the deepspeed launcher, torchrun and plain python: gloo on the
CPU, nccl on CUDA; helpers that are no-ops without a process group."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    start_time: float = field(default_factory=time.time)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(timeout_min: float) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed. One process without a launcher gets
    the environment of a world of one."""
    import deepspeed
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ or local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=timeout_min))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_mean(values: list[float], device) -> list[float]:
    """Element-wise mean over ranks of a short list of floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def zero3_partition_stats(module) -> dict:
    """How ZeRO-3 split `module`'s parameters: full element count, the elements each rank
    holds, and how many tensors are partitioned (the rest persist whole on every rank)."""
    full = local = parted = 0
    params = list(module.parameters())
    for p in params:
        if hasattr(p, "ds_tensor"):
            full += p.ds_numel
            local += p.ds_tensor.numel()
            parted += int(p.ds_tensor.numel() < p.ds_numel)
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
def all_threads():
    """Use every core while only this rank works (teacher fit, evaluation on rank 0)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def teardown() -> None:
    """Destroy the process group (without it, ranks abort at exit on the CPU backend)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
