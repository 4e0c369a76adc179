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
