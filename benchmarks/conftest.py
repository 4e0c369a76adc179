"""pytest configuration of the benchmark suite: markers, options, shared fixtures, the
default --benchmark-json path and the report written at the end of a run.

Markers: parity (correctness against the float64 oracle: fast, CI), speed (timed cases:
every case that runs in a subprocess and measures), memory (peak memory is recorded),
train_step (the ZeRO-3 training-step benchmark), heavy (cases skipped unless --bench-full:
on a CPU the kernels issue's target case, so that a plain `pytest benchmarks/` ends within
10 minutes on a slow 2-core machine). Every timed case is also marked `speed`, so
`-m "not speed"` and `-m parity` both select the parity cases alone.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from benchmarks.harness import DEVICE, OUT_DIR, REPO

MARKERS = {
    "parity": "parity against the float64 oracle (fast; the CI subset)",
    "speed": "timed in a fresh subprocess (median time, TFLOP/s); slow",
    "memory": "peak memory measured in a fresh subprocess",
    "train_step": "student + teacher training step under ZeRO-3",
    "heavy": "a heavy case (CPU: the kernels issue's target, N = 4096): skipped unless --bench-full",
}


def pytest_addoption(parser):
    g = parser.getgroup("prada_fast benchmarks")
    g.addoption("--bench-out", default=str(OUT_DIR),
                help="where bench.json (unless --benchmark-json says otherwise), table.md and the "
                     "plots go (default: benchmarks/out)")
    g.addoption("--bench-repeats", type=int, default=3, help="timed calls per op case (median)")
    g.addoption("--bench-warmup", type=int, default=1, help="untimed calls before them")
    g.addoption("--bench-assert-targets", action="store_true",
                help="assert the CPU targets of the kernels issue (chunked <= 0.8 x the reference's "
                     "time, <= 10 %% of its peak memory, faster and leaner than Liger's chunked "
                     "loss); off by default: timings are recorded, not asserted")
    g.addoption("--bench-no-report", action="store_true",
                help="do not write table.md and the plots at the end")
    g.addoption("--bench-full", action="store_true",
                help="also run the cases marked heavy (CPU: the kernels issue's target case "
                     "N = 4096 and its check; ~2x the suite's time)")


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    config._prada_bench_start = time.time()


def pytest_report_header(config):
    import torch
    return f"prada_fast benchmarks: device {DEVICE}, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Skip the heavy cases unless --bench-full; write --benchmark-json to
    <bench-out>/bench.json by default when timed cases run."""
    if not config.getoption("--bench-full"):
        skip = pytest.mark.skip(reason="heavy case: run with --bench-full")
        for item in items:
            if item.get_closest_marker("heavy"):
                item.add_marker(skip)
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or bs.disabled or bs.json or config.option.collectonly:
        return
    if any(item.get_closest_marker("speed") for item in items):
        out = Path(config.getoption("--bench-out"))
        out.mkdir(parents=True, exist_ok=True)
        bs.json = out / "bench.json"


def pytest_benchmark_generate_commit_info(config):
    """The commit from .git's files (no git process: it may race a commit in progress)."""
    info = {"id": "unknown", "branch": None, "dirty": None, "project": "prada_fast"}
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            name = ref[5:]
            info["branch"] = name.rsplit("/", 1)[-1]
            path = REPO / ".git" / name
            if path.exists():
                info["id"] = path.read_text().strip()
            else:
                packed = REPO / ".git" / "packed-refs"
                for line in packed.read_text().splitlines() if packed.exists() else []:
                    if line.endswith(" " + name):
                        info["id"] = line.split()[0]
        else:
            info["id"] = ref
    except OSError:
        pass
    return info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from prada_fast.common.envinfo import machine, versions
    output_json["prada"] = {
        "device": DEVICE, "versions": versions(), "machine": machine(),
        "command": "pytest " + " ".join(sys.argv[1:]) if sys.argv else "pytest",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": round(time.time() - config._prada_bench_start, 1),
    }


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """After pytest-benchmark has written the JSON: the markdown table and the plots."""
    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    path = Path(bs.json) if bs is not None and bs.json else None
    if path is None or config.getoption("--bench-no-report") or not path.exists():
        return
    if path.stat().st_mtime < config._prada_bench_start:  # not written by this run
        return
    out = Path(config.getoption("--bench-out"))
    try:
        from benchmarks.tools.report import write_report
        written = write_report(path, out)
    except Exception as e:  # noqa: BLE001 - a report problem must not hide the results
        sys.stderr.write(f"benchmarks: report not written: {e!r}\n")
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("benchmarks: wrote " + ", ".join(str(p) for p in written))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def bench_results():
    """Results of the op cases of this session, by (case id, impl), for the ratio checks."""
    return {}


@pytest.fixture(scope="session")
def gemm_ceiling():
    """Achieved matrix-product TFLOP/s on the device, measured once in a subprocess."""
    from benchmarks.harness import ON_GPU, run_module
    dtype = "bfloat16" if ON_GPU else "float32"
    try:
        return run_module("benchmarks.tools.run_case", ["ceiling", "--device", DEVICE, "--dtype", dtype])
    except AssertionError as e:
        sys.stderr.write(f"benchmarks: no matrix-product ceiling: {e}\n")
        return None


@pytest.fixture(scope="session")
def oracle_file(tmp_path_factory):
    """oracle_file(case) -> path of the case's float64 oracle, made in a subprocess once; only
    the latest case's file is kept (they can be GBs on a GPU)."""
    from benchmarks.cases import oracle_pieces, unavailable_reason
    from benchmarks.harness import run_module, speed_impls
    root = tmp_path_factory.mktemp("oracles")
    made: dict[str, Path] = {}

    def get(case):
        if case.id not in made:
            for old in made.values():
                old.unlink(missing_ok=True)
            made.clear()
            path = root / f"{case.id}.pt"
            impls = [i for i in speed_impls() if unavailable_reason(i, case, DEVICE, mode="speed") is None]
            pieces = ",".join(oracle_pieces(case, impls))
            run_module("benchmarks.tools.run_case", ["oracle", "--case", json.dumps(case.to_dict()),
                                               "--device", DEVICE, "--pieces", pieces,
                                               "--out", str(path)])
            made[case.id] = path
        return made[case.id]
    return get
