"""Fault recovery in multi-process runs: a rank killed mid-training, preemption (SIGTERM to
one rank, or to the deepspeed command alone), a crash during a checkpoint save, bad input,
non-finite losses; and determinism (to one fp32 rounding step). Each fault has a test
that fails if the behaviour regresses. (In-process checks: test_bad_input_and_checkpoints.py,
test_cli.py.)"""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from runner import FAST, FIT, REPO, assert_same_losses, metrics, same_metrics, train, train_cmd, train_env

from prada_fast.trainer import checkpoint
pytestmark = pytest.mark.slow
NO_DATA = FAST[2:]  # FAST without its --data
assert FAST[0] == "--data"
COMPARED = ("loss", "ce", "kd", "dom", "dom_acc", "grl_lambda", "lr")
STEPS = 16  # checkpoints at 4, 8, 12, 16; the faults come at steps 3 to 9


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory, cache, ds_config):
    """(args, run directory) of an uninterrupted two-rank run, STEPS steps, that the
    interrupted runs below are compared with."""
    args = [*FAST, "--ds", str(ds_config), "--max-steps", str(STEPS), "--save-every", "4", *FIT]
    full = tmp_path_factory.mktemp("full")
    train([*args, "--output-dir", str(full), "--overwrite"], cache, nproc=2)
    return args, full


def _kill_job(proc) -> None:
    """SIGKILL to the run's process group: the deepspeed command, its launcher and ranks."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc, timeout: float) -> str:
    """The run's output once every process holding its pipe has exited. A run still there
    after `timeout` (ranks hung in a collective) is killed, all of it, and fails the test."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        out = proc.communicate()[0]
        raise AssertionError(f"the run did not end within {timeout} s (killed): {out[-3000:]}") from None


def _start_and_wait(args, out, cache, steps):
    """Start a two-rank run in a process group of its own; return (process, {rank: pid})
    once `steps` steps are logged."""
    proc = subprocess.Popen(train_cmd([*args, "--output-dir", str(out)], nproc=2), cwd=REPO,
                            env=train_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logged = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").is_file() else 0
        if logged >= steps and (out / "ranks.json").is_file():
            return proc, json.loads((out / "ranks.json").read_text())
        time.sleep(0.05)
    _kill_job(proc)
    raise AssertionError(f"the run ended before step {steps}: {proc.communicate()[0][-3000:]}")


def _same_losses(full, cut):
    assert_same_losses(metrics(full), metrics(cut), STEPS, COMPARED)


def test_killed_rank_fails_fast_and_resume_matches_uninterrupted_run(tmp_path, cache, two_rank_reference):
    args, full = two_rank_reference
    cut = tmp_path / "cut"
    proc, pids = _start_and_wait(args, cut, cache, 9)  # wait for step 9, then kill rank 1
    os.kill(pids["1"], signal.SIGKILL)
    out = _finish(proc, 120)  # no hang
    assert proc.returncode != 0
    assert f"rank 1 (pid {pids['1']}) died" in out or "--local_rank=1" in out, out[-3000:]

    before = metrics(cut)  # the steps logged before the kill: same seed, same losses (to fp32 rounding)
    for ra, rb in zip(metrics(full), before):
        assert same_metrics(ra, rb, COMPARED), (ra, rb)

    train([*args, "--output-dir", str(cut), "--resume"], cache, nproc=2)
    _same_losses(full, cut)


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume_matches(tmp_path, cache,
                                                                             two_rank_reference):
    """A scheduler's SIGTERM, here reaching rank 1 only (as when DeepSpeed's launcher passes
    it on one rank after another): both ranks finish the step, agree to stop after the same
    one, save it (step 6 is no multiple of --save-every 4), print how to resume and exit 5;
    --resume then gives the losses of the uninterrupted run."""
    args, full = two_rank_reference
    cut = tmp_path / "cut"
    proc, pids = _start_and_wait(args, cut, cache, 5)
    os.kill(pids["1"], signal.SIGTERM)
    out = _finish(proc, 180)
    assert proc.returncode == 5, out[-3000:]
    last = metrics(cut)[-1]["step"]
    assert 5 <= last < STEPS and checkpoint.latest_tag(cut / "checkpoints") == f"step{last}", out[-3000:]
    assert checkpoint.problem(cut / "checkpoints" / f"step{last}") is None
    stopped = f"preempted (a stop signal to another rank): stopped after step {last} of {STEPS}"
    assert stopped in out, out[-3000:]
    assert "--resume" in out and "--output-dir" in out
    assert "lengths at --max-len 128: tokens per record" in out  # the first lines of the run
    proc = train([*args, "--output-dir", str(cut), "--resume"], cache, nproc=2)
    assert f"resumed from {cut / 'checkpoints' / f'step{last}'} at step {last}" in proc.stdout
    _same_losses(full, cut)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["lengths"]["max_len"] == 128 and summary["lengths"]["unusable"] == 0
    assert summary["steps_without_labels"] == 0


def test_sigterm_to_the_deepspeed_command_alone_stops_the_ranks(tmp_path, cache, two_rank_reference):
    """SIGTERM to the `deepspeed` command alone: DeepSpeed's runner dies without passing it
    on; the ranks see their launcher gone, stop after the same step with a checkpoint, and
    exit: no orphans keep training."""
    args, _ = two_rank_reference
    cut = tmp_path / "orphan"
    proc, pids = _start_and_wait(args, cut, cache, 3)
    os.kill(proc.pid, signal.SIGTERM)  # the runner only, not its process group
    out = _finish(proc, 180)  # EOF: every process holding the pipe has exited
    assert "preempted (the deepspeed command died)" in out, out[-3000:]
    last = metrics(cut)[-1]["step"]
    assert last < STEPS and checkpoint.latest_tag(cut / "checkpoints") == f"step{last}"
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class _FakeEngine:
    """save_checkpoint writes a shard, then dies (like a kill in the middle of a save)."""

    def __init__(self, die: bool):
        self.die = die

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = __import__("pathlib").Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "shard.pt").write_bytes(b"half a shard")
        if self.die:
            raise KeyboardInterrupt("killed while writing")


def test_crash_during_save_leaves_previous_checkpoint_latest(tmp_path):
    checkpoint.save(_FakeEngine(die=False), tmp_path, 4)
    assert checkpoint.latest_tag(tmp_path) == "step4"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(_FakeEngine(die=True), tmp_path, 8)
    assert (tmp_path / "latest").read_text() == "step4"
    assert checkpoint.latest_tag(tmp_path) == "step4" and not (tmp_path / "step8").exists()
    checkpoint.save(_FakeEngine(die=False), tmp_path, 8)  # a later save clears the partial one
    assert checkpoint.latest_tag(tmp_path) == "step8" and not (tmp_path / "step8.partial").exists()


def test_nan_steps_are_skipped_and_k_in_a_row_stop_the_run(tmp_path, cache):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    out = tmp_path / "nan"
    proc = train([*FAST, "--output-dir", str(out), "--max-steps", "10", "--save-every", "1", *FIT,
                  "--inject-nan", "4,6,7,8", "--max-bad-steps", "3"], cache, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 steps in a row" in proc.stderr and "step8" in proc.stderr
    rows = {r["step"]: r for r in metrics(out)}
    assert [s for s, r in rows.items() if r.get("skipped")] == [4, 6, 7, 8]
    assert checkpoint.latest_tag(out / "checkpoints") == "step8"

    def weights(tag):  # a world of one trains at stage 0: the weights are the engine's module state
        folder = out / "checkpoints" / tag
        if any(folder.glob("zero_pp_rank_*")):
            return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
        return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]

    w3, w4, w5, w8 = (weights(f"step{i}") for i in (3, 4, 5, 8))
    for k in w3:
        assert torch.isfinite(w8[k]).all()
        assert torch.equal(w3[k], w4[k]), k  # the NaN step 4 left the weights alone
        assert torch.equal(w5[k], w8[k]), k  # so did steps 6-8
    assert any(not torch.equal(w4[k], w5[k]) for k in w3)  # step 5 was a real step


def _bad_ds(tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg.update(train_batch_size=8, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=1)
    path = tmp_path / "contradict.json"
    path.write_text(json.dumps(cfg))
    return path


def _other_vocab_teacher(tmp_path):
    from prada_fast.models import load_causal_lm
    model, tok = load_causal_lm("tiny")
    model.resize_token_embeddings(300)
    path = tmp_path / "teacher300"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


BAD_INPUTS = {
    # name: (files to write {name: text}, extra args (TMP = tmp_path), words the message must hold)
    "malformed json line": ({"q.jsonl": '{"question": "a", "answer": "1"}\n{"question": \n'},
                            ["--data", "jsonl:TMP/q.jsonl?domain=x"], ["q.jsonl:2", "JSON"]),
    "missing field": ({"q.jsonl": '{"question": "a", "answer": "1"}\n{"answer": "2"}\n'},
                      ["--data", "jsonl:TMP/q.jsonl?domain=x"], ["q.jsonl:2", "question"]),
    "empty after split": ({"e.jsonl": ""}, ["--data", "jsonl:TMP/e.jsonl?domain=x"], ["no records"]),
    "domain not in data": ({}, ["--data", "synthetic:8", "--target-domains", "geometry"],
                           ["geometry", "arithmetic"]),
    "model path missing": ({}, ["--data", "synthetic:8", "--student", "TMP/no-model"], ["no-model"]),
    "ds config not json": ({"ds.json": '{"train_batch_size": 8,\n "zero": {"stage": 3,}}'},
                           ["--data", "synthetic:8", "--ds", "TMP/ds.json"], ["ds.json:2", "JSON"]),
    "sequence too long": ({}, ["--data", "synthetic:8", "--max-len", "20", "--on-long", "refuse"],
                          ["longer than --max-len 20", "synthetic"]),
    "not utf-8": ({}, ["--data", "jsonl:TMP/bad.jsonl?domain=x"], ["bad.jsonl:2", "not UTF-8"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, in_process, capsys):
    files, extra, words = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "bad.jsonl").write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "\xff"}\n')
    out = tmp_path / "run"
    argv = [*NO_DATA, "--output-dir", str(out), "--teacher", "none", "--max-steps", "2",
            *[a.replace("TMP", str(tmp_path)) for a in extra]]
    assert in_process(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w.lower() in err[0].lower(), (w, err[0])
    assert not out.exists()


def test_contradicting_batch_sizes_and_teacher_vocabulary(tmp_path, in_process, capsys):
    out = tmp_path / "run"
    assert in_process([*FAST, "--output-dir", str(out), "--ds", str(_bad_ds(tmp_path)),
                       "--max-steps", "2"]) == 2
    assert "contradict" in capsys.readouterr().err
    teacher = _other_vocab_teacher(tmp_path)
    assert in_process([*FAST, "--output-dir", str(out), "--teacher", str(teacher),
                       "--max-steps", "2"]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_is_refused_and_left_alone(tmp_path, in_process, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert in_process([*FAST, "--output-dir", str(out), "--teacher", "none", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_teardown_removes_this_ranks_deepspeed_shm_buffer(tmp_path, monkeypatch):
    """DeepSpeed's CPU all-reduce op leaves a 69 MB /dev/shm file per rank and run; teardown
    removes this rank's (named as DeepSpeed's shm.cpp names it) and nothing else."""
    import torch.distributed as dist

    from prada_fast.common.distributed import free_port, shm_buffer, teardown
    port = str(free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    mine = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    peer, other_run = mine.with_name(mine.name[:-1] + "1"), tmp_path / "deepspeed_allreduce_buffer_x"
    for f in (mine, peer, other_run):
        f.write_bytes(b"\0" * 8)
    assert shm_buffer(0, tmp_path) == mine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    teardown(shm_dir=tmp_path)
    assert not dist.is_initialized()
    assert not mine.exists() and peer.exists() and other_run.exists()
