"""The benchmark tools that decide what a GPU session measures: the micro-batch search, the
out-of-memory result of a training-step trial, the GPU session script's plumbing, and the
kernels compiled for Hopper."""
import json

import pytest
import torch

from benchmarks import train_step
from benchmarks.tools.max_batch import batch_sizes, is_out_of_memory


def test_batch_sizes_grow_geometrically_and_end_at_the_limit():
    assert batch_sizes(4, 20, 1.125) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20]
    assert batch_sizes(1, 3, 1.5) == [1, 2, 3]
    assert batch_sizes(5, 5, 2.0) == [5]
    sizes = batch_sizes(4, 512, 1.125)
    assert sizes[-1] == 512 and all(b < c <= max(b + 1, round(b * 1.125)) for b, c in zip(sizes, sizes[1:]))
    assert len(sizes) < 45  # ~log(128) / log(1.125) steps, not 508
    with pytest.raises(ValueError):
        batch_sizes(8, 4, 1.5)
    with pytest.raises(ValueError):
        batch_sizes(1, 4, 1.0)


def test_out_of_memory_is_recognised_through_libraries():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_train_step_reports_out_of_memory(monkeypatch, tmp_path):
    """A CUDA out-of-memory error in a trial is a result ({"oom": true}), not a crash."""
    def boom(a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_step, "measure", boom)
    out = tmp_path / "r.json"
    assert train_step.main(["--loss-impl", "reference", "--batch", "64", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["oom"] is True and res["batch"] == 64 and "out of memory" in res["error"]


def test_gpu_session_smoke(tmp_path, request):
    """Opt-in (--gpu-rehearsal: 4 minutes of a CI run's budget). Every stage of the GPU
    session script at tiny shapes on this machine (the Triton
    implementations interpreted on a CPU): the plumbing that a GPU call must not waste time
    on. Each stage writes its JSON, the parity checks inside pass, the report renders. The
    maxbatch stage is also the micro-batch search end to end on the CPU: real training steps
    of one set of engines (tiny presets; nothing runs out of memory on the CPU, so it stops
    at its limit), batches 1, 2, 3, and its JSON."""
    from pathlib import Path

    from benchmarks.tools import gpu_session

    if not request.config.getoption("--gpu-rehearsal"):
        pytest.skip("the GPU session's CPU rehearsal runs with --gpu-rehearsal")
    out = tmp_path / "gpu"
    # the deadline budgets a GPU call's time; here it only has to let every stage run, also on
    # a loaded CPU (the train stage's set-up alone took 300 s at a load of 7 on 2 cores)
    assert gpu_session.main(["smoke", "--out", str(out), "--deadline-s", "1500"]) == 0
    recs = gpu_session.load_records([out])
    assert set(recs) == set(gpu_session.STAGES)
    for name, rec in recs.items():
        assert not rec["errors"], (name, rec["errors"])
    ops = [r for n in ("op", "big", "tune", "compiled") for r in recs[n]["rows"] if "impl" in r]
    assert {"triton", "reference", "chunked", "liger_jsd", "liger_flce"} <= {r["impl"] for r in ops}
    for r in ops:
        assert r["median_s"] > 0 and not r["oom"], r
        if r["chunk_rows"] is None:  # the tuning runs have no oracle
            assert r["parity_failures"] == [], r
    assert [r["chunk_rows"] for r in recs["tune"]["rows"] if "impl" in r] == [16, 32]
    train = {r["impl"]: r for r in recs["train"]["rows"]}
    assert train["reference"]["losses"][0] == pytest.approx(train["chunked"]["losses"][0], rel=1e-5)
    assert {r["impl"] for r in recs["maxbatch"]["rows"]} == {"reference", "chunked"}
    for r in recs["maxbatch"]["rows"]:
        assert r["complete"] and r["largest_fitting"] == 3 and r["smallest_failing"] is None, r
        assert [t["batch"] for t in r["trials"]] == [1, 2, 3]
        assert all(t["fits"] and t["tokens_per_s"] > 0 for t in r["trials"]), r
    results = tmp_path / "RESULTS.md"  # the report fills RESULTS.md's gpu-session block, nothing else
    original = (Path(gpu_session.REPO) / "benchmarks" / "RESULTS.md").read_text()
    results.write_text(original)
    assert gpu_session.main(["report", str(out), "--update-results", str(results)]) == 0
    updated = results.read_text()
    head = original.split("<!-- results:gpu-session -->")[0]
    tail = original.split("<!-- /results:gpu-session -->")[1]
    assert updated.startswith(head) and updated.endswith(tail) and "### Targets" in updated
    text = gpu_session.render(recs)
    for heading in ("### Device", "### op", "### train", "### maxbatch", "row kernel C=4 V=300",
                    "### Targets"):
        assert heading in text


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """The Triton kernels compiled (not interpreted) for sm_90 with Triton's own ptxas, in a
    process without TRITON_INTERPRET: every configuration the autotuner may pick, and the
    domain kernels, compile with no spills, and the row kernel reads the logits with 16-byte
    loads. Catches compiled-mode-only errors and register blow-ups without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    subprocess.run([sys.executable, "-m", "benchmarks.tools.compile_report", "--json", str(out)], cwd=repo,
                   env=env, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    from prada_kernels.fused_linear_distill import GPU_CONFIGS
    row_kernel = [r for r in rows if r["kernel"] == "_distill_rows_kernel"]
    topk_kernel = [r for r in rows if r["kernel"] == "_distill_topk_rows_kernel"]
    # domain: pooling and head, unpacked and packed (seq_index), in bf16 and fp32
    assert len(row_kernel) == 4 * len(GPU_CONFIGS) and len(topk_kernel) == 2 * len(GPU_CONFIGS)
    assert len(rows) == len(row_kernel) + len(topk_kernel) + 8
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0, r  # no spills
        assert 0 < r["reg"] <= 255, r
    for r in row_kernel:
        assert r["loads_by_bits"].get("128", 0) >= (4 if r["teacher"] else 2), r  # z (and z_t), twice
    for r in topk_kernel:
        assert r["loads_by_bits"].get("128", 0) >= 2, r  # z, twice


def test_run_group_kills_the_whole_group_on_timeout(tmp_path):
    """A benchmark process that overruns is killed with its own children (which may hold GPU
    memory into the next stage otherwise)."""
    import os
    import sys
    import time

    from benchmarks.harness import run_group

    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    rc, _, _ = run_group([sys.executable, "-c", code], env=dict(os.environ), timeout=3)
    assert rc is None and time.monotonic() - t0 < 30
    child = int(pidfile.read_text())
    for _ in range(50):  # the grandchild is gone (reaped by init) within moments
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{child}/stat") as f:
            assert f.read().split()[2] == "Z", "the grandchild survived the timeout"


def test_run_module_keeps_the_partial_result_of_a_tool_cut_short(tmp_path):
    """A tool that rewrites its JSON as it goes (max_batch: "complete": false until the end)
    keeps what it measured when it dies or times out; any other failure stays a failure."""
    from benchmarks.harness import REPO, CaseFailed, run_module

    (tmp_path / "cut_short_tool.py").write_text(
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'complete': False, 'trials': [4, 5]}, open(path, 'w'))\n"
        "sys.exit(3)\n")
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}"}
    res = run_module("cut_short_tool", ["partial"], env=env, timeout=60)
    assert res["trials"] == [4, 5] and res["cut_short"].startswith("exit 3")
    (tmp_path / "cut_short_tool.py").write_text(
        "import json, sys\n"
        "json.dump({'trials': [4]}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n"
        "sys.exit(3)\n")
    with pytest.raises(CaseFailed, match="exited 3"):
        run_module("cut_short_tool", ["other"], env=env, timeout=60)


def _fake_peers_result(cmd: list[str], tokens_per_s: float, gpu: bool = False) -> None:
    """The JSON `python -m benchmarks.peers --trainers T --out X.md` leaves at X.json."""
    trainer = cmd[cmd.index("--trainers") + 1]
    out = cmd[cmd.index("--out") + 1]
    r = {"losses": [0.25, 0.2], "tokens": [100, 100], "step_ends": [1.0, 2.0], "tokens_per_s": tokens_per_s,
         "maxrss_bytes": 2**30, "rss_setup_bytes": 2**29, "bf16": gpu}
    if gpu:
        r.update(gpu_peak_allocated_bytes=3 * 2**30, gpu_peak_reserved_bytes=4 * 2**30,
                 gpu_setup_allocated_bytes=2**30, gpu_name="H200")
    json.dump({"trainers": {trainer: r}, "shapes": {"student": [64, 2], "teacher": [96, 3], "vocab": 259},
               "n_examples": 24, "cache": None}, open(out.replace(".md", ".json"), "w"))


def test_gpu_session_peers_stage_keeps_going_and_saves_each_result(tmp_path, monkeypatch):
    """The second command's stage (no model is built, no trainer runs: their process is faked):
    a trainer that fails is an error in the record and the next one runs; a trainer whose
    imports fail is not started; the stage's JSON is on disk after each trainer (a command
    killed at its limit keeps what finished); past the deadline the rest is listed as not run;
    the report's table and the target line come from the rows."""
    from pathlib import Path

    import benchmarks.peers
    from benchmarks.tools import gpu_session

    out = tmp_path / "out"
    calls, seen_on_disk = [], []

    def fake_run_group(cmd, env, timeout):
        trainer = cmd[cmd.index("--trainers") + 1]
        stage = out / "stage-peers.json"
        seen_on_disk.append(len(json.loads(stage.read_text())["rows"]) if stage.is_file() else None)
        calls.append((trainer, timeout))
        if trainer == "prada-live":
            return 1, "", "Traceback: boom"
        _fake_peers_result(cmd, {"trl-gkd-liger": 100.0, "trl-gkd": 80.0}.get(trainer, 150.0))
        return 0, "ok", ""

    monkeypatch.setattr(gpu_session, "run_group", fake_run_group)
    monkeypatch.setattr(gpu_session, "_import_problems", lambda mods: {})
    monkeypatch.setattr(benchmarks.peers, "model_dir", lambda name, work, seed: Path(work) / f"{name}-{seed}")
    assert gpu_session.main(["smoke", "peers", "--out", str(out), "--deadline-s", "600"]) == 1  # an error
    rec = json.loads((out / "stage-peers.json").read_text())
    assert [t for t, _ in calls] == ["prada-live", "trl-gkd-liger", "trl-gkd", "prada-topk"]
    assert seen_on_disk == [0, 0, 1, 2]  # written before the first trainer, then after each
    assert len(rec["errors"]) == 1 and rec["errors"][0].startswith("prada-live")
    assert "boom" in rec["errors"][0]
    assert [r["trainer"] for r in rec["rows"]] == ["trl-gkd-liger", "trl-gkd", "prada-topk"]
    # the first trainer leaves the second (the comparison) its minimum
    assert calls[0][1] <= 600 - gpu_session.PEERS["trl-gkd-liger"] + 1
    text = gpu_session.render(gpu_session.load_records([out]))
    assert "### peers" in text and "| TRL GKDTrainer + Liger-Kernel | 100 | 1.00x | 1.25x |" in text

    # imports missing for TRL: its rows are not started; a deadline already past: nothing starts
    calls.clear()
    monkeypatch.setattr(gpu_session, "_import_problems", lambda mods: {"trl": "ImportError: no trl"})
    out2 = tmp_path / "out2"
    assert gpu_session.main(["smoke", "peers", "--out", str(out2), "--deadline-s", "600",
                             "--only", "trl-gkd,prada-live"]) == 1
    rec = json.loads((out2 / "stage-peers-trl-gkd_prada-live.json").read_text())
    assert [t for t, _ in calls] == ["prada-live"] and "cannot import trl" in rec["errors"][-1]
    calls.clear()
    out3 = tmp_path / "out3"
    monkeypatch.setattr(gpu_session, "_import_problems", lambda mods: {})
    assert gpu_session.main(["smoke", "peers", "--out", str(out3), "--deadline-s", "10"]) == 0
    rec = json.loads((out3 / "stage-peers.json").read_text())
    assert calls == [] and len(rec["not_run"]) == 4 and "out of time" in rec["not_run"][0]


def test_gpu_session_peers_target_on_gpu_records(tmp_path):
    """The report of GPU records: tokens/s against TRL + Liger checked against the issue's
    1.3x, the peak GPU memory ratio beside it, the GPU columns filled."""
    from benchmarks.tools import gpu_session

    rows = []
    for t, tps, gib in (("prada-live", 260.0, 1), ("trl-gkd-liger", 200.0, 4), ("trl-gkd", 150.0, 5)):
        rows.append({"trainer": t, "tokens_per_s": tps, "gpu_peak_allocated_bytes": gib * 2**30,
                     "gpu_peak_reserved_bytes": gib * 2**30, "gpu_setup_allocated_bytes": 2**28,
                     "maxrss_bytes": 2**31, "first_loss": 0.23, "last_loss": 0.2, "seconds": 40.0,
                     "bf16": True})
    rec = {"stage": "peers", "command": "python -m benchmarks.tools.gpu_session peers", "started": "now",
           "device": "cuda", "gpu": "NVIDIA H200", "rows": rows, "not_run": [], "errors": [],
           "info": {"peers": {"student": "smollm2-shape-l8", "teacher": "smollm2-shape-l30"}}}
    text = gpu_session.render({"peers": rec})
    assert "end to end real tokens/s vs TRL GKDTrainer + Liger-Kernel (the real pair's shapes): 1.30" in text
    assert "(target >= 1.30): met" in text
    assert "peak GPU memory (allocated) vs TRL GKDTrainer + Liger-Kernel: 0.25" in text
    assert "| prada_fast (live teacher) | 260 | 1.30x | 1.73x | 1024 MiB | 0.25x |" in text


def test_gpu_session_second_command_rehearsal(tmp_path, request):
    """Opt-in (--gpu-rehearsal). The GPU session's second command as the device machine runs
    it, `bash benchmarks/gpu_session.sh peers --deadline-s 200`, with `smoke` before the stage
    (tiny presets, 3 steps of 4 sequences) and this machine's packages instead of the wheels:
    the wrapper, the models made once, one `python -m benchmarks.peers` per trainer (TRL +
    Liger too: its Triton kernels interpreted), each row in the stage's JSON, prada_fast's
    first-batch loss equal to TRL's, the report's table."""
    import os
    import subprocess
    import time

    from benchmarks.harness import REPO
    from benchmarks.tools import gpu_session

    if not request.config.getoption("--gpu-rehearsal"):
        pytest.skip("the GPU session's CPU rehearsal runs with --gpu-rehearsal")
    pytest.importorskip("trl")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_SESSION_T0", "TRITON_INTERPRET")}
    env.update(OUT=str(out), GPU_SESSION_SITE=str(tmp_path / "site"), GPU_SESSION_NO_WHEELS="1")
    # the deadline budgets the GPU's 4 minutes; a loaded 2-core CPU needs longer for the same plumbing
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "smoke", "peers", "--deadline-s", "900"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    took = time.monotonic() - t0
    rec = json.loads((out / "stage-peers.json").read_text())
    assert proc.returncode == 0 and not rec["errors"], (proc.returncode, rec["errors"], proc.stderr[-3000:])
    # TRL + Liger runs up to the first launch of Liger's kernels, which the interpreter cannot run
    assert len(rec["not_run"]) == 1, rec["not_run"]
    assert rec["not_run"][0].startswith("trl-gkd-liger: Liger-Kernel's Triton"), rec["not_run"]
    rows = {r["trainer"]: r for r in rec["rows"]}
    assert list(rows) == [t for t in gpu_session.PEERS if t != "trl-gkd-liger"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["steps"] == 3 and r["gpu_peak_allocated_bytes"] is None, r
    assert [(c["vs"], c["ok"]) for c in rec["checks"]] == [("trl-gkd", True)], rec["checks"]
    assert {p.name for p in out.iterdir()} == {"stage-peers.json", "peers.log"}  # what $OUT brings back
    assert "### peers" in proc.stdout and "prada_fast (live teacher)" in proc.stdout
    print(f"second command rehearsed in {took:.0f} s")


def test_peers_table_on_gpu_records():
    """benchmarks.peers' markdown from a CUDA run's summary (what only a GPU produces): the
    precision named, the TRL + Liger row in the main table, a second table with the peak GPU
    memory against TRL + Liger."""
    import argparse

    from benchmarks import peers

    def trainer(tps, gib):
        return {"tokens_per_s": tps, "maxrss_bytes": 3 * 2**30, "rss_setup_bytes": 2**30,
                "losses": [0.23, 0.2], "bf16": True, "gpu_peak_allocated_bytes": gib * 2**30,
                "gpu_peak_reserved_bytes": (gib + 1) * 2**30, "gpu_setup_allocated_bytes": 2**29,
                "gpu_name": "NVIDIA H200"}

    s = {"shapes": {"student": [576, 8], "teacher": [576, 30], "vocab": 49152},
         "student": "smollm2-shape-l8", "teacher": "smollm2-shape-l30", "date": "2026-12-03 12:00 UTC",
         "machine": "16 CPUs", "cap_bytes": None, "liger_run": True, "trl_missing": False, "check": None,
         "cache": None, "op": None, "wall_s": 100.0, "n_examples": 1200,
         "trainers": {"prada-live": trainer(300.0, 4), "trl-gkd-liger": trainer(200.0, 12),
                      "trl-gkd": trainer(180.0, 13)}}
    args = argparse.Namespace(steps=25, batch=128, max_len=256, threads=4, lr=1e-4, temperature=1.0,
                              data="synthetic:400", k=0, max_batch_estimate=False)
    text = peers.table(s, args)
    assert "bf16 (prada_fast: DeepSpeed bf16" in text and "| TRL GKDTrainer + Liger-Kernel | 200 |" in text
    assert "| trainer (NVIDIA H200) | real tokens/s | vs TRL GKDTrainer + Liger-Kernel |" in text
    assert "| prada_fast (live teacher) | 300 | 1.50x | 4096 MiB | 0.33x | 5120 MiB | 512 MiB |" in text
    assert "not run" not in text
