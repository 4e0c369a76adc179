"""Two "nodes" on this machine, over the loopback address only: torchrun started twice
(--nnodes 2 --nproc_per_node 1, c10d rendezvous on 127.0.0.1) and DeepSpeed's launcher
started once per node from a hostfile of two loopback "hosts" (--no_ssh --node_rank R).
Both give the losses of one node with two ranks (deepspeed --num_gpus 2), a checkpoint the
two nodes write resumes to the uninterrupted run, and the output directory's single-writer
files are written once, by global rank 0. The commands are README's "Launchers and
several machines"."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runner import FAST, REPO, assert_same_losses, metrics, train, train_env

from prada_fast.common.distributed import free_port
from prada_fast.trainer import checkpoint

pytestmark = pytest.mark.slow
COMPARED = ("loss", "ce", "kd", "dom", "dom_acc", "grl_lambda", "lr")
STEPS = 5


def _fast(**values) -> list[str]:
    """FAST with some flags' values replaced ("eval_per_domain": "0" for --eval-per-domain)."""
    args = list(FAST)
    for name, value in values.items():
        args[args.index("--" + name.replace("_", "-")) + 1] = value
    return args


# FAST with a smaller data set and no held-out records (no evaluation), no teacher.
ARGS = [*_fast(data="synthetic:24", eval_per_domain="0"), "--teacher", "none", "--max-steps", str(STEPS)]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


def torchrun_cmds(port: int, args) -> list[list[str]]:
    """One torchrun per node; c10d rendezvous on 127.0.0.1:port."""
    return [[_tool("torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "prada_fast/train.py", *args] for r in (0, 1)]


def deepspeed_cmds(hostfile: Path, port: int, args) -> list[list[str]]:
    """One deepspeed launcher per node, from the hostfile, without ssh."""
    return [[_tool("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
             "--master_addr", "127.0.0.1", "--master_port", str(port),
             "prada_fast/train.py", *args] for r in (0, 1)]


def run_nodes(cmds, cache, timeout=300) -> list[str]:
    """Start the nodes' commands together, each in a process group of its own; their
    outputs once both exited 0 (a node still running after `timeout` is killed, all of it)."""
    procs = [subprocess.Popen(c, cwd=REPO, env=train_env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"two nodes did not end within {timeout} s: {cmds}") from None
    for c, p, out in zip(cmds, procs, outs, strict=True):
        assert p.returncode == 0, f"{c} exited {p.returncode}\n{out[-5000:]}"
    return outs


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, cache, ds_config):
    """One node, two ranks, STEPS steps uninterrupted: the reference."""
    out = tmp_path_factory.mktemp("one-node")
    train([*ARGS, "--ds", str(ds_config), "--output-dir", str(out), "--overwrite"], cache, nproc=2)
    return out


def assert_written_once(out: Path, outs: list[str], steps: int) -> None:
    """metrics.jsonl has each step once, ranks.json names both ranks, the summary a world of
    two, the newest checkpoint is `latest` with its manifest, final/ exists; exactly one
    node (global rank 0's) prints the run's log."""
    assert [r["step"] for r in metrics(out)] == list(range(1, steps + 1))
    ranks = json.loads((out / "ranks.json").read_text())
    assert sorted(ranks) == ["0", "1"] and len(set(ranks.values())) == 2, ranks
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    assert len(summary["zero3"]["local_numel"]) == 2
    ckpts = out / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == f"step{steps}"
    manifest = json.loads((ckpts / f"step{steps}" / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == steps and manifest["world_size"] == 2
    assert checkpoint.problem(ckpts / f"step{steps}") is None
    assert (out / "final").is_dir()
    assert sum("final loss" in o for o in outs) == 1, [o[-2000:] for o in outs]
    assert sum("[prada]" in o for o in outs) == 1, [o[-2000:] for o in outs]


def test_torchrun_two_nodes_match_one_node_and_write_once(tmp_path, cache, ds_config, one_node):
    """torchrun --nnodes 2 --nproc_per_node 1, started twice: the losses of one node x two
    ranks, every step logged once. (c10d assigns the global ranks at the rendezvous, so
    either process may be rank 0: exactly one of them writes and logs.)"""
    out = tmp_path / "torchrun"
    outs = run_nodes(torchrun_cmds(free_port(), [*ARGS, "--ds", str(ds_config), "--output-dir", str(out)]),
                     cache)
    assert_same_losses(metrics(one_node), metrics(out), STEPS, COMPARED)
    assert_written_once(out, outs, STEPS)


def test_deepspeed_no_ssh_two_nodes_checkpoint_resumes_to_the_one_node_run(tmp_path, cache, ds_config,
                                                                          one_node):
    """deepspeed --hostfile (127.0.0.1 and 127.0.0.2, one slot each) --no_ssh --node_rank R,
    started once per node: --stop-after 3 saves step 3, --resume on the two nodes again runs
    steps 4 and 5, and the run equals the uninterrupted one-node run. Node 0 holds global
    rank 0 (DeepSpeed numbers the ranks in hostfile order) and alone logs and writes."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out = tmp_path / "deepspeed"
    args = [*ARGS, "--ds", str(ds_config), "--output-dir", str(out)]
    port = free_port()
    outs = run_nodes(deepspeed_cmds(hostfile, port, [*args, "--stop-after", "3"]), cache)
    assert "--stop-after" in outs[0] and checkpoint.latest_tag(out / "checkpoints") == "step3"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]

    port = free_port()
    outs = run_nodes(deepspeed_cmds(hostfile, port, [*args, "--resume"]), cache)
    assert f"resumed from {out / 'checkpoints' / 'step3'} at step 3" in outs[0], outs[0][-3000:]
    assert "[prada]" not in outs[1], outs[1][-3000:]
    assert_same_losses(metrics(one_node), metrics(out), STEPS, COMPARED)
    assert_written_once(out, outs, STEPS)
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, left  # each rank removed its DeepSpeed shared-memory buffer


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every split gives one thread")
def test_cpu_threads_are_split_between_the_ranks_of_this_node_not_of_all_nodes(monkeypatch):
    """Under DeepSpeed's launcher with two nodes of one rank each (WORLD_SIZE 2, LOCAL_SIZE
    1, no LOCAL_WORLD_SIZE), the one rank on this node gets all of its cores."""
    import torch
    import torch.distributed as dist

    from prada_fast.common import distributed
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # no process group is made
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    before = torch.get_num_threads()
    try:
        info = distributed.setup(1.0)
        assert (info.rank, info.world_size, info.local_rank) == (1, 2, 0)
        assert torch.get_num_threads() == os.cpu_count()
        monkeypatch.setenv("LOCAL_SIZE", "2")  # two ranks on this node: half each
        distributed.setup(1.0)
        assert torch.get_num_threads() == os.cpu_count() // 2
    finally:
        torch.set_num_threads(before)
