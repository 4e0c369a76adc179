"""Training-step benchmark: tokens per second and peak memory of a full student + teacher
step under DeepSpeed ZeRO-3, fused vs reference loss, each in a fresh subprocess
(`python -m benchmarks.train_step`).

CPU: the tiny presets with a 32000-id vocabulary, 8 x 256 tokens (single process, gloo);
GPU: a Qwen2.5-0.5B-shaped student and a 1.5B-shaped teacher (random weights), bf16.
The first step's loss (before any update) must agree between the loss implementations:
the same model, batch and objective."""
from __future__ import annotations

import pytest

from benchmarks.harness import DEVICE, ON_GPU, record, replay_timer, run_module, train_config, train_impls

IMPLS = train_impls()


@pytest.fixture(scope="session")
def train_results():
    return {}


@pytest.mark.speed
@pytest.mark.memory
@pytest.mark.train_step
@pytest.mark.benchmark(timer=replay_timer)
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(impl, benchmark, train_results):
    cfg = train_config()
    args = ["--loss-impl", impl]
    for k in ("student", "teacher", "vocab", "batch", "seq", "warmup", "steps"):
        args += [f"--{k}", str(cfg[k])]
    res = run_module("benchmarks.train_step", args, timeout=3600)
    train_results[impl] = res
    ref = train_results.get("reference")
    extra = {"kind": "train_step", "impl": impl, "device": DEVICE, "student": res["student"],
             "teacher": res["teacher"], "V": res["vocab"], "batch": res["batch"], "seq": res["seq"],
             "tokens_per_s": res["tokens_per_s"], "median_s": res["median_s"],
             "peak_extra_bytes": res["peak_extra_bytes"], "peak_total_bytes": res["peak_total_bytes"],
             "bf16": res["bf16"], "first_loss": res["losses"][0], "threads": res["threads"]}
    if ref and impl != "reference":
        extra["tokens_per_s_vs_reference"] = res["tokens_per_s"] / ref["tokens_per_s"]
        extra["memory_vs_reference"] = res["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1)
    record(benchmark, res["times_s"], f"train step {res['student']} + {res['teacher']} V={res['vocab']}",
           extra)
    others = [r for k, r in train_results.items() if k != impl]
    if others:  # same model, batch and objective: the same loss before the first update
        tol = 2e-2 if ON_GPU else 1e-5
        l0, l1 = res["losses"][0], others[0]["losses"][0]
        assert abs(l0 - l1) <= tol * abs(l1), f"first-step loss {l0} ({impl}) vs {l1}"
