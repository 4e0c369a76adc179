"""Bad input and checkpoints, in this process (fast): one line for every bad file (data,
model directories, DeepSpeed configs, checkpoints) and a traceback for a bug; checkpoints
that stay usable (manifest, fallback, --keep-checkpoints, a failed save); data that cannot
teach; the training loop's stop on a signal, the watch on the DeepSpeed launcher, and its
steps without a labelled token; a real one-rank run (the length distribution, preemption
with exit 5, --keep-checkpoints, a truncated checkpoint at --resume, resumed losses to one
fp32 rounding step); safe loading of final/. The two-rank runs (preemption, resume) are in
test_fault_recovery.py."""
import argparse
import json
import os
import shutil
import signal

import pytest
import torch
from runner import assert_same_losses

from prada_fast.trainer import checkpoint
from prada_fast.trainer import loop as trainloop
from prada_fast.trainer.loop import LoopSettings
from prada_fast.trainer.rundir import RunDir
from prada_fast.data import DataError, Record, load_spec
from prada_fast.data.prepare import check_lengths, describe_lengths, encode_all
from prada_fast.trainer.dsconfig import ConfigError, load_ds_config
from prada_fast.models import (ModelError, PradaConfig, PradaModel, byte_tokenizer, check_model_dir,
                               load_causal_lm)
from prada_fast.trainer.preemption import Preempted, StopRequest

FAST = ["--data", "synthetic:48", "--eval-per-domain", "0", "--no-progress", "--log-every", "1",
        "--max-len", "128", "--teacher", "none"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------- data files
def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "1"}\n\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"q\.jsonl:3: not UTF-8: byte 0xe9 at column 18"):
        load_spec(f"jsonl:{path}?domain=x")
    assert load_spec(f"jsonl:{path}?domain=x", skip_bad=True)[1] == 1  # a bad record: skippable
    arr = tmp_path / "strategyqa_x.json"
    arr.write_bytes(b'[\n {"question": "q\xff", "answer": true, "facts": []}\n]')
    with pytest.raises(DataError, match=r"strategyqa_x\.json:2: not UTF-8: byte 0xff at column 17"):
        load_spec(str(arr))


def test_non_utf8_data_file_is_one_line_exit_2(tmp_path, in_process, capsys):
    (tmp_path / "q.jsonl").write_bytes(b'{"question": "\xff", "answer": "1"}\n')
    out = tmp_path / "run"
    assert in_process([*FAST, "--data", f"jsonl:{tmp_path}/q.jsonl?domain=x", "--output-dir", str(out)]) == 2
    line = _one_line(capsys)
    assert "q.jsonl:1" in line and "UTF-8" in line
    assert not out.exists()


def test_a_bug_keeps_its_traceback(tmp_path, in_process, monkeypatch):
    from prada_fast import train

    def broken(args):
        raise ZeroDivisionError("a bug, not bad input")
    monkeypatch.setattr(train, "load_data", broken)
    with pytest.raises(ZeroDivisionError):
        in_process([*FAST, "--output-dir", str(tmp_path / "run")])


# ----------------------------------------------------------------------------- model directories
@pytest.fixture
def model_dir(tied_student, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tied_student, path)
    return path


def _broken(path, how):
    if how == "no config.json":
        (path / "config.json").unlink()
    elif how == "config not JSON":
        (path / "config.json").write_text('{"model_type": "llama",\n}')
    elif how == "unknown model_type":
        (path / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    elif how == "no weights":
        (path / "model.safetensors").unlink()
    elif how == "missing shard":
        (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif how == "no tokenizer":
        for f in path.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
                f.unlink()


@pytest.mark.parametrize("how, words", [
    ("no config.json", ["no config.json"]),
    ("config not JSON", ["config.json:2", "not valid JSON"]),
    ("unknown model_type", ["nosuchmodel", "unknown to transformers"]),
    ("no weights", ["no weights", "model.safetensors"]),
    ("missing shard", ["model-00002-of-00002.safetensors", "missing"]),
    ("no tokenizer", ["no tokenizer files"]),
])
def test_model_directory_problems_are_named(model_dir, how, words):
    _broken(model_dir, how)
    with pytest.raises(ModelError) as e:
        load_causal_lm(str(model_dir))
    msg = str(e.value)
    assert str(model_dir) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_truncated_weights_are_one_line(model_dir):
    w = model_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    check_model_dir(str(model_dir))  # the files are there: only loading can tell
    with pytest.raises(ModelError, match="transformers cannot load it") as e:
        load_causal_lm(str(model_dir))
    assert str(model_dir) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_student_is_flag_error_before_any_work(model_dir, tmp_path, in_process, capsys):
    _broken(model_dir, "no weights")
    out = tmp_path / "run"
    assert in_process([*FAST, "--student", str(model_dir), "--output-dir", str(out)]) == 2
    line = _one_line(capsys)
    assert "--student" in line and "no weights" in line and str(model_dir) in line
    assert not out.exists()


# ----------------------------------------------------------------------------- DeepSpeed configs
@pytest.mark.parametrize("content, words", [
    (b'{"train_batch_size": 8, "bf16": \xff}', ["not UTF-8"]),
    (b'{"train_batch_size": 8, "bf16": true}', ["'bf16'", "JSON object"]),
    (b'{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": [1]}}', ["optimizer.params"]),
    (b'{"train_batch_size": 8}', ["--lr", "no optimizer"]),
])
def test_ds_config_problems_are_one_line(tmp_path, content, words):
    path = tmp_path / "ds.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_ds_config(path, world_size=1, device=torch.device("cpu"), max_steps=4, lr=1e-3)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_ds_config_field_deepspeed_refuses_is_one_line(tmp_path, in_process, capsys):
    from runner import REPO
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistance_treshold"] = 0  # a typo
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert in_process([*FAST, "--ds", str(path), "--output-dir", str(out)]) == 2
    line = _one_line(capsys)
    assert "typo.json" in line and "DeepSpeed refuses it" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- checkpoints
class FakeEngine:
    """save_checkpoint writes two shards; load_checkpoint returns the client state saved."""

    def __init__(self, fail: BaseException | None = None, stage: int = 0):
        self.fail, self.clients, self.loaded, self.stage = fail, {}, [], stage

    def zero_optimization_stage(self):
        return self.stage

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = os.path.join(save_dir, tag)
        os.makedirs(d)
        with open(os.path.join(d, "model_states.pt"), "wb") as f:
            f.write(b"m" * 100)
        if self.fail is not None:
            raise self.fail
        with open(os.path.join(d, "optim_states.pt"), "wb") as f:
            f.write(b"o" * 1000)
        self.clients[tag.removesuffix(".partial")] = client_state

    def load_checkpoint(self, load_dir, tag):
        self.loaded.append(tag)
        return load_dir, self.clients[tag]


def test_checkpoint_manifest_fallback_and_keep(tmp_path):
    eng = FakeEngine()
    for step in (2, 4, 6):
        checkpoint.save(eng, tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step4", "step6"]  # --keep-checkpoints 2
    manifest = json.loads((tmp_path / "step6" / checkpoint.MANIFEST).read_text())
    assert manifest["files"] == {"model_states.pt": 100, "optim_states.pt": 1000}
    shard = tmp_path / "step6" / "optim_states.pt"
    shard.write_bytes(b"o" * 10)  # truncated
    said = []
    tag, client = checkpoint.load(eng, tmp_path, log=said.append)
    assert tag == "step4" and client["step"] == 4 and eng.loaded == ["step4"]
    assert f"{shard} is truncated (10 of 1000 bytes)" in said[0]
    assert "using the previous complete checkpoint" in said[1] and "step4" in said[1]
    shard.unlink()  # missing
    assert checkpoint.choose(tmp_path)[1][0].endswith(f"{shard} is missing")
    (tmp_path / "step4" / "model_states.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        checkpoint.load(eng, tmp_path, log=said.append)


def test_latest_naming_a_missing_checkpoint_falls_back(tmp_path):
    eng = FakeEngine()
    checkpoint.save(eng, tmp_path, 3)
    (tmp_path / "latest").write_text("step9")
    assert checkpoint.choose(tmp_path) == ("step3", [
        f"checkpoint step9 is unusable: {tmp_path / 'step9'} is missing",
        f"using the previous complete checkpoint, {tmp_path / 'step3'}"])
    assert checkpoint.choose(tmp_path / "none") == (None, [])


def test_checkpoint_of_another_world_size_is_refused(tmp_path):
    eng = FakeEngine()
    checkpoint.save(eng, tmp_path, 3)
    m = tmp_path / "step3" / checkpoint.MANIFEST
    m.write_text(m.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(checkpoint.CheckpointError, match="saved by 2 ranks and this run has 1"):
        checkpoint.load(eng, tmp_path)


def test_checkpoint_of_another_zero_stage_is_refused_with_the_flag_that_resumes_it(tmp_path):
    checkpoint.save(FakeEngine(stage=3), tmp_path / "z3", 3)
    assert json.loads((tmp_path / "z3" / "step3" / checkpoint.MANIFEST).read_text())["zero_stage"] == 3
    with pytest.raises(checkpoint.CheckpointError, match=r"saved at ZeRO stage 3 and this run trains at "
                                                         r"stage 0: resume with --one-rank-zero keep"):
        checkpoint.load(FakeEngine(stage=0), tmp_path / "z3")
    eng = FakeEngine(stage=0)
    checkpoint.save(eng, tmp_path / "z0", 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"ZeRO stage 0 and this run trains at stage 3: "
                                                         r"resume with --one-rank-zero skip"):
        checkpoint.load(FakeEngine(stage=3), tmp_path / "z0")
    assert checkpoint.load(eng, tmp_path / "z0")[0] == "step2"
    # manifests from before the stage was recorded: ZeRO's partition files tell
    folder = tmp_path / "z0" / "step2"
    legacy = json.loads((folder / checkpoint.MANIFEST).read_text())
    del legacy["zero_stage"]
    (folder / checkpoint.MANIFEST).write_text(json.dumps(legacy))
    assert checkpoint.load(eng, tmp_path / "z0")[0] == "step2"
    for name in list(legacy["files"]):
        (folder / name).rename(folder / f"zero_pp_rank_0_mp_rank_00_{name}")
        legacy["files"][f"zero_pp_rank_0_mp_rank_00_{name}"] = legacy["files"].pop(name)
    (folder / checkpoint.MANIFEST).write_text(json.dumps(legacy))
    with pytest.raises(checkpoint.CheckpointError, match="saved at a ZeRO stage above 0 and this "
                                                         "run trains at stage 0: resume with "
                                                         "--one-rank-zero keep"):
        checkpoint.load(eng, tmp_path / "z0")
    eng.stage = 3
    assert checkpoint.load(eng, tmp_path / "z0")[0] == "step2"


def test_failed_save_leaves_previous_latest_and_one_line(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, 4)
    full = OSError(28, "No space left on device")
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        checkpoint.save(FakeEngine(fail=full), tmp_path, 8)
    msg = str(e.value)
    assert "step8 could not be written" in msg and "No space left on device" in msg
    assert f"still {tmp_path / 'step4'}" in msg and "\n" not in msg
    assert (tmp_path / "latest").read_text() == "step4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step4"]  # the partial is gone
    with pytest.raises(KeyError):  # not the disk: a bug, its own exception and traceback
        checkpoint.save(FakeEngine(fail=KeyError("bug")), tmp_path, 8)
    assert (tmp_path / "latest").read_text() == "step4"


def test_failed_save_in_a_run_exits_6_with_one_line(tmp_path, in_process, capsys, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    real, calls = TorchCheckpointEngine.save, []

    def disk_full_at_second_save(self, state_dict, path):
        calls.append(path)
        if "step4" in path:
            raise OSError(28, "No space left on device")
        return real(self, state_dict, path)
    monkeypatch.setattr(TorchCheckpointEngine, "save", disk_full_at_second_save)
    out = tmp_path / "run"
    assert in_process([*FAST, "--output-dir", str(out), "--max-steps", "6", "--save-every", "2"]) == 6
    line = _one_line(capsys)
    assert "step4 could not be written" in line and "No space left on device" in line, line
    ckpt = out / "checkpoints"
    assert checkpoint.latest_tag(ckpt) == "step2" and not (ckpt / "step4.partial").exists()
    assert checkpoint.problem(ckpt / "step2") is None
    assert not (out / "final").exists()
    # a checkpoint file of the right size but garbage: --resume names it, one line, exit 2
    shard = max((ckpt / "step2").glob("*.pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(b"\0" * shard.stat().st_size)
    # the real save again (not monkeypatch.undo(), which would also undo in_process's world
    # of one and leave the run's RANK and MASTER_PORT in this process's environment)
    monkeypatch.setattr(TorchCheckpointEngine, "save", real)
    assert in_process([*FAST, "--output-dir", str(out), "--max-steps", "6", "--resume"]) == 2
    line = _one_line(capsys)
    assert f"{ckpt / 'step2'}: DeepSpeed could not load this checkpoint" in line, line


# ----------------------------------------------------------------------------- data that cannot teach
def _encode(records, max_len):
    return encode_all(records, byte_tokenizer(), max_len, {"d": 0, "t": 1})


def _records():
    long_q = Record("x" * 60, "r" * 10, "7", "d", origin="f.jsonl:2")  # prompt 66 tokens
    return [Record("short?", "because", "1", "d", origin="f.jsonl:1"), long_q,
            Record("y" * 80, None, None, "t", labelled=False, origin="f.jsonl:3")]


def test_records_left_without_labels_are_refused_with_a_max_len_that_keeps_them():
    examples, stats = _encode(_records(), 40)
    assert stats["unusable"] == 1 and stats["truncated"] == 2 and stats["labelled_records"] == 2
    assert stats["max_len_one_label"] == 67 and stats["max_len_whole"] == examples[1]["length"] == 95
    with pytest.raises(DataError) as e:
        check_lengths(stats, None)
    msg = str(e.value)
    for w in ("1 of 2 labelled training records keep no labelled token at --max-len 40",
              "f.jsonl:2", "--max-len 67", "--max-len 95", "--on-long truncate"):
        assert w in msg, (w, msg)
    warning = check_lengths(stats, "truncate")  # asked for explicitly, and labels remain
    assert warning.startswith("warning: 1 of 2") and "domain loss only" in warning
    with pytest.raises(DataError, match="2 of 3 training records are longer than --max-len 40"):
        check_lengths(stats, "refuse")
    line = describe_lengths(stats)
    assert "--max-len 40" in line and "tokens per record min 38" in line and "max 95" in line
    assert check_lengths(_encode(_records(), 100)[1], None) is None


def test_no_labelled_token_left_is_refused_even_with_truncate():
    _, stats = _encode(_records()[1:], 40)
    with pytest.raises(DataError, match="no labelled token is left at --max-len 40"):
        check_lengths(stats, "truncate")
    _, stats = _encode(_records()[2:], 200)
    with pytest.raises(DataError, match="no labelled"):
        check_lengths(stats, "truncate")


def test_run_on_data_that_cannot_teach_exits_2_before_the_teacher(tmp_path, in_process, capsys):
    out, teachers = tmp_path / "run", tmp_path / "teachers"
    # a short run and a cache of its own: without the check this fails in seconds, writing only here
    assert in_process([*FAST, "--max-len", "24", "--teacher", "auto", "--teacher-fit-cache", str(teachers),
                       "--teacher-steps", "1", "--max-steps", "1", "--output-dir", str(out)]) == 2
    line = _one_line(capsys)
    assert line == ("error: 96 of 144 labelled training records keep no labelled token at --max-len 24: "
                    "the prompt alone fills the row (first: synthetic:coinflip:20). --max-len 55 keeps at "
                    "least one labelled token of each, --max-len 102 every record whole; or pass --on-long "
                    "truncate to train on the labelled tokens that remain"), line
    assert not out.exists() and not teachers.exists()  # no teacher was fitted


# ----------------------------------------------------------------------------- the training loop
class LoopEngine:
    skipped_steps = 0
    device = torch.device("cpu")
    module = argparse.Namespace(n_prompt=0)

    def get_lr(self):
        return [0.1]


class Batches:
    world_size, accum = 1, 1

    def __init__(self, empty=()):
        self.empty = set(empty)

    def step(self, step):
        mb = {"attention_mask": torch.ones(2, 4), "input_ids": torch.zeros(2, 4, dtype=torch.long),
              "domain_labels": torch.zeros(2, dtype=torch.long)}
        return [mb], 0 if step + 1 in self.empty else 8


def _loop_args(**kw):
    base = dict(max_steps=8, stop_after=0, show_progress=False, inject_nan=frozenset(), use_domain=False,
                log_every=100, max_bad_steps=5, save_every=0, keep_checkpoints=0, temperature=1.0,
                alpha=0.5)
    return LoopSettings(**{**base, **kw})


@pytest.fixture
def loop(monkeypatch, tmp_path):
    """train_steps with a fake engine; returns (run(args, batches, on_step), saved steps, log)."""
    saved, said = [], []
    monkeypatch.setattr(trainloop.checkpoint, "save",
                        lambda eng, d, step, extra, keep=0, rank_state=None: saved.append(step))

    def run(args, batches, on_step=lambda step: None):
        def micro_step(engine, t_engine, mb, **kw):
            on_step(len(said_steps) + 1)
            said_steps.append(1)
            return torch.tensor(1.0), {"ce": 1.0, "kd": 0.0, "dom": 0.0, "dom_acc": 0.5}
        said_steps = []
        monkeypatch.setattr(trainloop, "micro_step", micro_step)
        return trainloop.train_steps(LoopEngine(), None, batches, args, start=0, run=RunDir(tmp_path),
                                     ckpt_dir=tmp_path / "ck", log=said.append)
    return run, saved, said


def test_a_signal_stops_the_loop_after_the_step_with_a_checkpoint(loop, tmp_path):
    run, saved, said = loop
    before = signal.getsignal(signal.SIGUSR1)

    def signal_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(Preempted) as e:
        run(_loop_args(save_every=2), Batches(), signal_at_3)
    assert (e.value.step, e.value.reason) == (3, "SIGUSR1") and saved == [2, 3]
    assert e.value.checkpoint == tmp_path / "ck" / "step3"
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is the loop's only
    saved.clear()
    with pytest.raises(Preempted):  # at a step that saves anyway: one save
        run(_loop_args(save_every=2), Batches(), lambda s: s == 4 and os.kill(os.getpid(), signal.SIGTERM))
    assert saved == [2, 4]  # no second save of step 4


def test_the_deepspeed_launcher_above_a_rank_is_watched(monkeypatch):
    """Under `deepspeed`, the rank's parent is deepspeed.launcher.launch and its parent the
    deepspeed runner (their /proc entries faked here): the rank stops when either dies."""
    from prada_fast.trainer import preemption
    launcher, runner = 4241, 4242  # not the real parent: pytest may itself run under PID 1
    monkeypatch.setattr(os, "getppid", lambda: launcher)
    parents = {launcher: runner}
    cmd = {launcher: "python -u -m deepspeed.launcher.launch --world_info=e30= prada_fast/train.py",
           runner: "python /venv/bin/deepspeed --num_gpus 2 prada_fast/train.py"}
    monkeypatch.setattr(preemption, "_cmdline", lambda pid: cmd.get(pid, ""))
    monkeypatch.setattr(preemption, "_proc_ppid", lambda pid: parents.get(pid))
    with StopRequest() as stop:
        assert (stop._launcher, stop._runner) == (launcher, runner) and not stop.requested()
        parents[launcher] = 1  # the runner died: its child, the launcher, was re-parented
        assert stop.requested() and stop.reason == "the deepspeed command died"
    parents[launcher] = runner
    with StopRequest() as stop:
        monkeypatch.setattr(os, "getppid", lambda: 1)  # the launcher died: this rank re-parented
        assert stop.requested() and stop.reason == "the DeepSpeed launcher process died"
    monkeypatch.setattr(os, "getppid", lambda: launcher)
    cmd.clear()
    with StopRequest() as stop:  # plain python or torchrun: no launcher to watch
        assert stop._launcher is None and not stop.requested()


def test_a_step_without_labelled_tokens_is_never_silent(loop, tmp_path):
    run, saved, said = loop
    stats = run(_loop_args(max_steps=4), Batches(empty={2}))
    assert stats["steps"] == 4 and saved == [4]
    assert any(s.startswith("step 2: no labelled token") for s in said), said
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["no_labels"] is True  # logged off-cycle


# ----------------------------------------------------------------------------- a real run, in this process
COMPARED = ("loss", "ce", "kd", "dom", "dom_acc", "grl_lambda", "lr")


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(a: list[dict], b: list[dict], steps: int) -> None:
    assert_same_losses(a, b, steps, COMPARED)


def test_preemption_keep_checkpoints_and_fallback_in_a_run(tmp_path, in_process, capsys, monkeypatch):
    """One rank, 6 steps: the length distribution among the first lines and in summary.json;
    --keep-checkpoints 2; a truncated checkpoint named at --resume and the previous one
    used; SIGTERM in step 3: that step finished and saved, one line saying how to resume,
    exit 5. Each --resume gives the losses of the uninterrupted run (to fp32 rounding).
    (The two-rank version, the signal to one rank or to the launcher: test_fault_recovery.py.)"""
    common = [*FAST, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "2", "--seed", "4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert in_process([*common, "--output-dir", str(full)]) == 0
    out = capsys.readouterr().out.splitlines()
    first = "[prada] lengths at --max-len 128: tokens per record min "
    lengths = [i for i, s in enumerate(out) if s.startswith(first)]
    sharding = [i for i, s in enumerate(out) if s.startswith("[prada] ZeRO stage 0:")]
    assert lengths and sharding and lengths[0] < sharding[0], out  # before training starts
    summary = json.loads((full / "summary.json").read_text())
    n = summary["lengths"]["records"]
    assert n > 0 and summary["lengths"]["labelled_records"] <= n
    assert summary["lengths"]["max_len"] == 128 and summary["lengths"]["unusable"] == 0
    assert summary["lengths"]["tokens"]["max"] == summary["lengths"]["max_len_whole"] <= 128
    assert summary["steps_without_labels"] == 0
    ckpt = full / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step4", "step6"]  # step2 pruned
    assert (full / "final" / "prada_heads.safetensors").is_file()
    assert not (full / "final" / "prada_heads.pt").exists()
    reference = _rows(full)

    # a truncated file of the newest checkpoint: named, step4 used, steps 5-6 recomputed
    shard = max((ckpt / "step6").glob("*.pt"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    assert in_process([*common, "--output-dir", str(full), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint step6 is unusable: {shard} is truncated ({size // 2} of {size} bytes)" in out, out
    assert f"using the previous complete checkpoint, {ckpt / 'step4'}" in out
    assert f"resumed from {ckpt / 'step4'} at step 4" in out
    _assert_same_losses(reference, _rows(full), 6)
    assert checkpoint.problem(ckpt / "step6") is None  # written again

    # SIGTERM during step 3
    real, calls = trainloop._optimizer_step, []

    def sigterm_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    before = signal.getsignal(signal.SIGTERM)
    argv = [*common, "--output-dir", str(cut)]
    with monkeypatch.context() as m:
        m.setattr(trainloop, "_optimizer_step", sigterm_in_step_3)
        assert in_process(argv) == 5
    assert signal.getsignal(signal.SIGTERM) == before
    err = capsys.readouterr().err.strip().splitlines()
    step3 = cut / "checkpoints" / "step3"
    assert err == [f"preempted (SIGTERM): stopped after step 3 of 6, checkpoint {step3}. Continue with "
                   f"the same launcher and: prada_fast/train.py {' '.join(argv)} --resume"], err
    assert [r["step"] for r in _rows(cut)] == [1, 2, 3] and not (cut / "final").exists()
    assert checkpoint.latest_tag(cut / "checkpoints") == "step3"  # not a multiple of --save-every
    assert checkpoint.problem(step3) is None
    assert in_process([*argv, "--resume"]) == 0
    assert f"resumed from {step3} at step 3" in capsys.readouterr().out
    _assert_same_losses(reference, _rows(cut), 6)


# ----------------------------------------------------------------------------- safe loading of final/
def _final(tmp_path):
    student, tok = load_causal_lm("tiny", seed=3)
    model = PradaModel(student, PradaConfig(n_domains=3, n_prompt=4))
    path = tmp_path / "final"
    student.save_pretrained(path)
    tok.save_pretrained(path)
    model.save_heads(path, {"soft_prompt": model.soft_prompt.data,
                            "domain_head": model.domain_head.state_dict()},
                     {"domains": ["a", "b", "c"], "n_prompt": 4, "domain_head": "linear"})
    return model, path


def test_final_heads_are_safetensors_and_a_pickle_is_refused(tmp_path, monkeypatch):
    model, path = _final(tmp_path)
    assert (path / "prada_heads.safetensors").is_file() and not (path / "prada_heads.pt").exists()

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called: final/ must load without unpickling")
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded, _, meta = PradaModel.from_final(path)
    assert torch.equal(loaded.soft_prompt, model.soft_prompt)
    assert torch.equal(loaded.domain_head.out.weight, model.domain_head.out.weight)
    monkeypatch.undo()

    heads = path / "prada_heads.safetensors"
    heads.unlink()
    torch.save({"soft_prompt": model.soft_prompt.data}, path / "prada_heads.pt")
    with pytest.raises(ModelError, match=r"prada_heads\.pt: a pickle .* refused"):
        PradaModel.from_final(path)
    (path / "prada_heads.pt").rename(heads)  # a pickle under the safetensors name
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        PradaModel.from_final(path)


def test_pickled_student_weights_in_final_are_refused(tmp_path):
    model, path = _final(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save(model.student.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin \(a pickle\)"):
        PradaModel.from_final(path)


def test_a_world_of_one_chooses_another_port_when_its_port_is_taken():
    """A single process picks a free port for its process group; when another process takes
    it first (EADDRINUSE: seen in CI with runs started side by side), it picks again."""
    import subprocess
    import sys

    from runner import REPO
    code = (
        "import os, socket\n"
        "from prada_fast.common import distributed as du\n"
        "busy = socket.socket(); busy.bind(('127.0.0.1', 0)); busy.listen()\n"
        "taken = busy.getsockname()[1]; first = iter([taken]); free = du.free_port\n"
        "du.free_port = lambda: next(first, None) or free()\n"
        "info = du.setup(1.0)\n"
        "print('world', info.world_size, 'moved', os.environ['MASTER_PORT'] != str(taken))\n"
        "du.teardown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_PORT", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "world 1 moved True" in proc.stdout, proc.stderr[-2000:]
