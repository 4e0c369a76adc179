"""One script for a GPU session: checks and times what the GPU issue asks for, in stages
that each fit one call of the device machine (< 10 minutes), writing logs and JSON under
--out ($OUT there) and printing a short table last.

    bash benchmarks/gpu_session.sh STAGE [STAGE ...]       # on the device machine
    python -m benchmarks.tools.gpu_session STAGE [STAGE ...] [--out DIR] [--deadline-s 540]
    python -m benchmarks.tools.gpu_session report DIR [DIR ...] [--update-results benchmarks/RESULTS.md]

Stages, in the order worth running them (a stage stops starting new work at its deadline
and records what it left out):
  env       device, driver and versions; the bf16 matrix-product ceiling (8192^3 and the
            LM-head shapes) and the copy bandwidth
  correct   pytest tests/test_kernels.py on CUDA (every teacher form: hidden states + head,
            logits, top-K log-probabilities), then pytest benchmarks -m parity
  op        the target case N=8192 H=4096 V=128256, teacher H_t=4096, bf16: triton,
            reference, liger_jsd, chunked, each checked against float64; then CE only
            (no teacher, no domain head): triton, liger_flce, cce; then the same case with
            the teacher as top-64 log-probabilities (3 products, not 4): triton, reference
  train     one ZeRO-3 step, Qwen2.5-0.5B-shaped student + 1.5B-shaped teacher, bf16, SDPA,
            4 x 1024 tokens: tokens/s of reference and triton
  maxbatch  the largest micro-batch of that step (sequences of 1024; within 12.5 %),
            reference and triton
  big       N=65536 V=262144 H=H_t=4096 bf16: triton against float64 (no out-of-memory)
  tune      the target case at 512-4096 rows per chunk; the row kernel alone (bandwidth,
            the autotuner's choice) at V = 32000 / 128256 / 262144
  compiled  reference under torch.compile and Liger's chunked JSD (slow to compile)
  peers     the second command (benchmarks/NOTES.md): distillation end to end at the real
            pair's shapes (SmolLM2-135M-shaped teacher, its 8-layer pruned student, V = 49152,
            weights drawn from the configs), bf16, one `python -m benchmarks.peers` per trainer:
            prada_fast (live teacher), TRL GKDTrainer + Liger-Kernel (use_liger_kernel), TRL
            GKDTrainer, then prada_fast from a top-k cache as time allows; real tokens/s and
            peak GPU memory side by side; the stage's JSON is rewritten after each trainer
  smoke     every stage's plumbing at tiny shapes, on whatever device is here (CI: CPU);
            `smoke STAGE...`: those stages only (`smoke peers`: the second command's rehearsal)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.cases import check_errors, oracle_pieces, rows_case, unavailable_reason
from benchmarks.harness import REPO, CaseFailed, child_env, run_group, run_module
from benchmarks.tools.report import MiB, fmt, md_table, op_table, train_table, update_results, versions_text
from prada_fast.common.envinfo import machine, versions

STAGES = ("env", "correct", "op", "train", "maxbatch", "big", "tune", "compiled")
SECOND = ("peers",)  # not in `smoke` alone: `smoke peers` rehearses them
TARGETS = {"vs_liger_jsd": 0.9, "vs_reference_time": 0.5, "vs_reference_memory": 0.10,
           "of_ceiling": 0.60, "train_tokens": 1.3, "train_batch": 1.5, "peers_tokens": 1.3}
# the peers stage's trainers in the order they run: the issue's comparison first (prada_fast,
# TRL + Liger), then plain TRL, then the top-k cache; with the seconds each needs at least
# (GPU: process start, imports, models to the GPU, Triton compilation in the warm-up steps)
PEERS = {"prada-live": 75, "trl-gkd-liger": 50, "trl-gkd": 40, "prada-topk": 60}
PEERS_REQUIRED = ("prada-live", "trl-gkd-liger")


def shapes(smoke: bool) -> dict:
    """The cases of each stage: the issue's shapes, or tiny ones for the smoke run."""
    if smoke:
        # interpreted Triton costs per row and tile: 48 rows (chunks of 16 and 32: 3, and 2
        # with a partial one), 3 tiles of 128 ids (the last partial); the micro-batch search
        # from 1 to 3: trials 1, 2, 3
        return dict(target=rows_case(48, 32, 300, 24, "float32"),
                    ce=rows_case(48, 32, 300, 0, "float32", D=0),
                    big=rows_case(64, 32, 400, 32, "float32"), chunks=(16, 32), rows=[(4, 300)],
                    train=dict(student="tiny", teacher="tiny-teacher", vocab=300, batch=1, seq=16),
                    max_limit=3, dtype="float32", topk=None,
                    # the second command: 3 steps of 4 sequences per trainer, tiny presets
                    peers=dict(student="tiny", teacher="tiny-teacher", batch=4, steps=3, warmup=1,
                               data="synthetic:12:arithmetic,coinflip", max_len=64, k=4, threads=1))
    return dict(target=rows_case(8192, 4096, 128256, 4096, "bfloat16"),
                ce=rows_case(8192, 4096, 128256, 0, "bfloat16", D=0),
                topk=rows_case(8192, 4096, 128256, 0, "bfloat16", topk=64),
                big=rows_case(65536, 4096, 262144, 4096, "bfloat16"),
                chunks=(512, 1024, 2048, 4096), rows=[(2048, 32000), (2048, 128256), (1024, 262144)],
                train=dict(student="qwen2.5-0.5b", teacher="qwen2.5-1.5b", vocab=0, batch=4, seq=1024),
                max_limit=512, dtype="bfloat16",
                # the real pair's shapes (benchmarks/peers.py SHAPES); byte tokens, ~67 per
                # example: 128 sequences are ~8.6k real tokens a step, what 32-64 sequences of a
                # real BPE-tokenised rationale data set would be; 25 steps, the first 5 not timed
                peers=dict(student="smollm2-shape-l8", teacher="smollm2-shape-l30",
                           data="synthetic:400:arithmetic,coinflip,lastletter", batch=128, steps=25,
                           warmup=5, max_len=256, k=32, threads=4))


class Session:
    def __init__(self, out: Path, deadline_s: float, smoke: bool, only: set[str] | None = None,
                 suffix: str = ""):
        self.out, self.smoke, self.only, self.suffix = out, smoke, only, suffix
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # the deadline counts from the wrapper's start (wheel install, imports), when it says so
        started = float(os.environ.get("GPU_SESSION_T0", time.time()))
        self.end = time.monotonic() + deadline_s - max(0.0, time.time() - started)
        self.shapes = shapes(smoke)
        out.mkdir(parents=True, exist_ok=True)
        # float64 oracles (GiBs at the issue's shapes): outside --out, which the device tool
        # copies back; kept for the next call while the machine stays warm
        self.oracles = Path(tempfile.gettempdir()) / ("prada-oracles-smoke" if smoke else "prada-oracles")
        self.oracles.mkdir(parents=True, exist_ok=True)

    def pick(self, impls: list[str]) -> list[str]:
        """The implementations a stage runs: all of them, or those of --only."""
        return [i for i in impls if not self.only or i in self.only]

    def left(self) -> float:
        return self.end - time.monotonic()

    def save(self, rec: dict) -> None:
        """The stage's record as it stands, to OUT/stage-NAME.json (rewritten whole, by a
        rename: a command killed at its time limit leaves the last complete version)."""
        path = self.out / f"stage-{rec['stage']}{self.suffix}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        tmp.replace(path)

    def log(self, stage: str, text: str) -> None:
        with open(self.out / f"{stage}.log", "a") as f:
            f.write(text.rstrip() + "\n")
        print(text.rstrip().splitlines()[-1] if text.strip() else "", file=sys.stderr, flush=True)

    def module(self, stage: str, rec: dict, what: str, module: str, args: list[str],
               need_s: float = 30, interpret: bool = False, env: dict | None = None) -> dict | None:
        """Run `python -m module args` if the deadline allows; its JSON, or None (recorded)."""
        if self.left() < need_s:
            rec["not_run"].append(f"{what}: out of time ({self.left():.0f} s left, needs ~{need_s:.0f})")
            return None
        t0 = time.monotonic()
        try:
            res = run_module(module, args, timeout=max(10.0, self.left()), interpret_triton=interpret,
                             env=env)
        except CaseFailed as e:
            rec["errors"].append(f"{what}: {str(e)[-1500:]}")
            self.log(stage, f"[{what}] FAILED\n{e}")
            return None
        self.log(stage, f"[{what}] {time.monotonic() - t0:.0f} s: {json.dumps(res)[:3000]}")
        return res

    def pytest(self, stage: str, rec: dict, what: str, args: list[str]) -> None:
        if self.left() < 60:
            rec["not_run"].append(f"{what}: out of time")
            return
        cmd = [sys.executable, "-m", "pytest", *args, "-q", "-rs", "-p", "no:cacheprovider"]
        t0 = time.monotonic()
        rc, out, err = run_group(cmd, env=child_env(), timeout=self.left())
        rc, text = ("timeout" if rc is None else rc), out + err
        summary = [ln for ln in text.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
        rec["rows"].append({"check": what, "rc": rc, "summary": summary[-1] if summary else text[-300:],
                            "seconds": time.monotonic() - t0})
        self.log(stage, f"[{what}] {' '.join(cmd)}\n{text}")


# ----------------------------------------------------------------------------- stages
def stage_env(s: Session, rec: dict) -> None:
    rec["info"] = {"machine": machine(), "versions": versions(), "device": s.device, **_gpu_info(s)}
    dtype = s.shapes["dtype"]
    gemms = [None] if s.smoke else [None, (2048, 4096, 128256), (128256, 2048, 4096), (2048, 128256, 4096)]
    from benchmarks.cases import copy_bandwidth, gemm_ceiling
    for shape in gemms:
        r = gemm_ceiling(s.device, dtype, shape)
        rec["rows"].append({"what": "matmul", **r})
    if s.device == "cuda":
        rec["rows"].append({"what": "copy", **copy_bandwidth(s.device)})


def _op(s: Session, rec: dict, stage: str, case, impls, *, repeats: int, warmup: int = 2,
        chunk_rows=None, oracle: bool = True) -> None:
    if s.smoke:  # plumbing: one call (it compiles too), and the memory probe's
        repeats, warmup = 1, 0
    args = ["--case", json.dumps(case.to_dict())]
    need = oracle_pieces(case, s.pick(impls))  # only what these implementations need
    pieces = ",".join(need)
    oracle_path = s.oracles / f"oracle-{case.id}-{'_'.join(need)}.pt"
    for have in s.oracles.glob(f"oracle-{case.id}-*.pt"):  # one with more pieces serves too
        if set(need) <= set(have.stem.split("-")[-1].split("_")):
            oracle_path = have
            break
    if oracle and not oracle_path.exists():
        s.module(stage, rec, f"oracle {case.id} ({pieces})", "benchmarks.tools.run_case",
                 ["oracle", *args, "--pieces", pieces, "--out", str(oracle_path)], need_s=60)
    # smoke: the Triton implementations run interpreted on a CPU (plumbing, not timing)
    interpret = s.smoke and s.device != "cuda"
    for impl in s.pick(impls):
        why = unavailable_reason(impl, case, s.device, mode="parity" if interpret else "speed")
        if why:
            rec["not_run"].append(f"{impl} on {case.id}: {why}")
            continue
        extra = ["--chunk-rows", str(chunk_rows)] if chunk_rows else []
        if oracle_path.exists():
            extra += ["--oracle", str(oracle_path)]
        res = s.module(stage, rec, f"{impl} {case.id}{f' chunk {chunk_rows}' if chunk_rows else ''}",
                       "benchmarks.tools.run_case", ["op", "--impl", impl, *args, "--warmup", str(warmup),
                                               "--repeats", str(repeats), *extra],
                       need_s=45, interpret=interpret)
        if res is not None:
            bad = check_errors(res["errors"], case.dtype) if "errors" in res else ["not checked"]
            rec["rows"].append({"case": case.id, "impl": impl, "chunk_rows": chunk_rows,
                                "median_s": res.get("median_s"),
                                "peak_extra_bytes": res.get("peak_extra_bytes"),
                                "tflops": res.get("tflops"), "oom": res.get("oom", False),
                                "errors": res.get("errors"), "parity_failures": bad,
                                "configs": res.get("row_kernel_configs")})


def stage_correct(s: Session, rec: dict) -> None:
    if s.smoke:
        s.pytest("correct", rec, "kernel tests", ["tests/test_kernels.py", "-k", "really_run or autotuned"])
    else:
        s.pytest("correct", rec, "kernel tests", ["tests/test_kernels.py"])
        # the compiled peers (torch.compile, minutes per shape) are left to the `compiled` stage
        not_compiled = "not reference_compiled and not liger_jsd_chunked"
        s.pytest("correct", rec, "parity benchmarks",
                 ["benchmarks", "-m", "parity", "--benchmark-disable", "-k", not_compiled])
    # the fused op inside DeepSpeed ZeRO-3 on CUDA (NCCL), small and early: not first in `train`
    impl = "triton" if s.device == "cuda" else "chunked"
    t0 = time.monotonic()
    res = s.module("correct", rec, f"train step {impl} (tiny)", "benchmarks.train_step",
                   ["--loss-impl", impl, "--student", "tiny", "--teacher", "tiny-teacher", "--vocab",
                    "300" if s.smoke else "32000", "--batch", "2", "--seq", "64", "--warmup", "1",
                    "--steps", "2"], need_s=60)
    rec["rows"].append({"check": f"train step {impl} (tiny presets, ZeRO-3)",
                        "rc": 0 if res and not res.get("oom") else 1,
                        "summary": f"losses {res['losses']}" if res else "failed (see errors)",
                        "seconds": time.monotonic() - t0})


def stage_op(s: Session, rec: dict) -> None:
    reps = 3 if s.smoke else 10
    _op(s, rec, "op", s.shapes["target"], ["triton", "reference", "liger_jsd", "chunked"], repeats=reps)
    _op(s, rec, "op", s.shapes["ce"], ["triton", "liger_flce", "cce"], repeats=reps)
    if s.shapes["topk"] is not None:  # not in the smoke run: the same plumbing as the target case
        _op(s, rec, "op", s.shapes["topk"], ["triton", "reference"], repeats=reps)


def stage_compiled(s: Session, rec: dict) -> None:
    _op(s, rec, "compiled", s.shapes["target"], ["reference_compiled", "liger_jsd_chunked"],
        repeats=3 if s.smoke else 10)


def stage_big(s: Session, rec: dict) -> None:
    _op(s, rec, "big", s.shapes["big"], ["triton"], repeats=2, warmup=1)


def stage_tune(s: Session, rec: dict) -> None:
    target = s.shapes["target"]
    for c in s.shapes["chunks"]:
        _op(s, rec, "tune", target, ["triton"], repeats=3 if s.smoke else 10, chunk_rows=c, oracle=False)
    for C, V in s.shapes["rows"]:
        res = s.module("tune", rec, f"rows C={C} V={V}", "benchmarks.tools.run_case",
                       ["rows", "--C", str(C), "--V", str(V), "--Ht", "1", "--dtype", s.shapes["dtype"],
                        "--device", s.device, *(["--repeats", "1"] if s.smoke else [])],
                       interpret=s.device != "cuda")
        if res is not None:
            rec["rows"].append({"rows": f"C={C} V={V}", **{k: res[k] for k in ("bytes", "triton", "torch")}})


def _model_args(t: dict, impl: str) -> list[str]:
    """The loss path, models and sequence length of the training-step stages."""
    return ["--loss-impl", impl, "--student", t["student"], "--teacher", t["teacher"],
            "--vocab", str(t["vocab"]), "--seq", str(t["seq"])]


def _train_impls(s: Session) -> list[str]:
    return s.pick(["reference", "triton"] if s.device == "cuda" else ["reference", "chunked"])


def stage_train(s: Session, rec: dict) -> None:
    t = s.shapes["train"]
    for impl in _train_impls(s):
        res = s.module("train", rec, f"train step {impl}", "benchmarks.train_step",
                       [*_model_args(t, impl), "--batch", str(t["batch"]), "--warmup", "2",
                        "--steps", "3" if s.smoke else "8"],
                       need_s=90)
        if res is not None:
            rec["rows"].append({"impl": impl, **{k: res.get(k) for k in (
                "tokens_per_s", "median_s", "peak_extra_bytes", "peak_total_bytes", "oom", "losses",
                "attn", "bf16", "vocab", "batch", "seq", "student", "teacher")}})


def stage_maxbatch(s: Session, rec: dict) -> None:
    t = s.shapes["train"]
    impls = _train_impls(s)
    for i, impl in enumerate(impls):
        args = [*_model_args(t, impl), "--start", str(t["batch"]), "--limit", str(s.shapes["max_limit"])]
        # leave the other implementation its share of the call; expandable segments: fragmentation
        # must not decide the answer (for both implementations alike)
        share = s.left() / (len(impls) - i)
        args += ["--deadline-s", str(max(60, int(share - 30)))]
        res = s.module("maxbatch", rec, f"max batch {impl}", "benchmarks.tools.max_batch", args, need_s=120,
                       env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
        if res is not None:
            rec["rows"].append({"impl": impl, **{k: res.get(k) for k in (
                "largest_fitting", "smallest_failing", "trials", "complete", "setup_s", "factor",
                "cut_short")}})


PEERS_IMPORTS = {"trl-gkd": ("datasets", "trl", "trl.experimental.gkd"),
                 "trl-gkd-liger": ("datasets", "trl", "trl.experimental.gkd", "liger_kernel.transformers"),
                 "prada-live": ("deepspeed",), "prada-topk": ("deepspeed",)}


def _import_problems(modules) -> dict:
    """{module: error} for each of `modules` that does not import here (in seconds, so that a
    missing or broken wheel is named before any trainer starts)."""
    import importlib
    bad = {}
    for m in dict.fromkeys(modules):
        try:
            importlib.import_module(m)
        except Exception as e:  # ImportError, or a version clash raising anything at import
            bad[m] = f"{type(e).__name__}: {str(e)[:300]}"
    return bad


def _peers_row(trainer: str, r: dict, seconds: float) -> dict:
    """One trainer's line of the peers stage, from benchmarks.peers' JSON."""
    keep = ("tokens_per_s", "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes",
            "gpu_setup_allocated_bytes", "maxrss_bytes", "rss_setup_bytes", "bf16", "threads", "gpu_name")
    return {"trainer": trainer, "steps": len(r["losses"]), "real_tokens": sum(r["tokens"]),
            "first_loss": r["losses"][0], "last_loss": r["losses"][-1], "losses": r["losses"],
            "seconds": seconds, **{k: r.get(k) for k in keep}}


def stage_peers(s: Session, rec: dict) -> None:
    """The second command: one `python -m benchmarks.peers --trainers T` per trainer (PEERS
    order), within the deadline; the models (config-built, seeded) are made once, first, in a
    work folder outside --out (GBs of weights the device tool must not copy back)."""
    from benchmarks.peers import TRAINERS, model_dir
    from prada_fast.teacher.resolve import TeacherSpec
    p = s.shapes["peers"]
    work = Path(tempfile.gettempdir()) / ("prada-peers-smoke" if s.smoke else "prada-peers")
    work.mkdir(parents=True, exist_ok=True)
    cuda = s.device == "cuda"
    rec["info"] = {"machine": machine(), "versions": versions(), "device": s.device, **_gpu_info(s),
                   "peers": {**p, "work": str(work)}}
    from benchmarks.peers import versions as peer_versions
    have = {k.replace("_", "-") for k in rec["info"]["versions"]}
    rec["info"]["versions"].update({k: v for k, v in peer_versions().items() if k not in have})  # + trl
    trainers = s.pick(list(PEERS))
    t0 = time.monotonic()
    problems = _import_problems(m for t in trainers for m in PEERS_IMPORTS[t])
    rec["info"]["import_problems"] = problems
    student = model_dir(p["student"], work, 0)  # peers' seeds (--seed 0): the runs reuse these
    teacher = model_dir(p["teacher"], work, TeacherSpec(seed=0).init_seed)
    s.log("peers", f"[set-up] imports checked, models in {work}: {time.monotonic() - t0:.0f} s "
                   f"({student.name}, {teacher.name}); import problems: {problems or 'none'}")
    s.save(rec)
    base = ["--student", str(student), "--teacher", str(teacher), "--data", p["data"],
            "--steps", str(p["steps"]), "--warmup", str(p["warmup"]), "--batch", str(p["batch"]),
            "--max-len", str(p["max_len"]), "--threads", str(p["threads"]), "--no-max-batch", "--no-op",
            "--device", s.device]
    for i, t in enumerate(trainers):
        missing = [m for m in PEERS_IMPORTS[t] if m in problems]
        if missing:
            rec["errors"].append(f"{t}: not run, cannot import {', '.join(missing)}: "
                                 f"{'; '.join(problems[m] for m in missing)}")
            s.save(rec)
            continue
        # leave the trainers of the issue's comparison still to come their minimum
        reserve = sum(PEERS[u] for u in trainers[i + 1:] if u in PEERS_REQUIRED)
        if s.left() < PEERS[t]:
            rec["not_run"].append(f"{t}: out of time ({s.left():.0f} s left, needs ~{PEERS[t]})")
            s.save(rec)
            continue
        timeout = max(PEERS[t], s.left() - reserve)
        out_md = work / f"peers-{t}.md"
        out_md.with_suffix(".json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.peers", *base, "--trainers", t,
               "--k", str(p["k"] if t == "prada-topk" else 0), "--out", str(out_md)]
        # Liger's Triton kernels on a CPU (the rehearsal): under the interpreter
        env = child_env(interpret_triton=t == "trl-gkd-liger" and not cuda)
        t1 = time.monotonic()
        rc, out, err = run_group(cmd, env=env, timeout=timeout)
        took = time.monotonic() - t1
        self_cmd = " ".join(["python -m benchmarks.peers", *cmd[3:]])
        s.log("peers", f"[{t}] {took:.0f} s, exit {rc}: {self_cmd}\n{out}\n{err}")
        res = out_md.with_suffix(".json")
        interpreted = "InterpreterError" in err and "liger_kernel" in err
        if rc != 0 and not cuda and t == "trl-gkd-liger" and interpreted:
            # a CPU (the rehearsal): Liger's kernels fail in Triton's interpreter at their first
            # launch; everything before it (TRL's use_liger_kernel, Liger's patching) has run
            rec["not_run"].append(f"{t}: Liger-Kernel's Triton kernels do not run under Triton's interpreter "
                                  f"(expected on a CPU; TRL's use_liger_kernel path ran up to their first "
                                  f"launch): {err.strip().splitlines()[-1][:300]}")
        elif rc != 0 or not res.is_file():
            why = f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}"
            rec["errors"].append(f"{t} ({TRAINERS[t]}): {why}: {(out + err)[-1500:]}")
        else:
            summary = json.loads(res.read_text())
            r = summary["trainers"][t]
            rec["rows"].append(_peers_row(t, r, took))
            if "shapes" not in rec["info"]:
                rec["info"]["shapes"] = summary["shapes"]
                rec["info"]["n_examples"] = summary["n_examples"]
            if summary.get("cache"):
                rec["info"]["topk_cache"] = summary["cache"]
        s.save(rec)  # at once: the next trainer may run into the call's limit
    rows = {r["trainer"]: r for r in rec["rows"]}
    if "prada-live" in rows:  # the same objective on the same first batch (top-k: an approximation)
        tol = 3e-2 if cuda else 1e-4  # bf16 on the GPU (TRL: autocast; prada_fast: bf16 weights)
        for t in ("trl-gkd-liger", "trl-gkd"):
            if t in rows:
                a, b = rows["prada-live"]["first_loss"], rows[t]["first_loss"]
                rel = abs(a - b) / max(abs(b), 1e-30)
                rec.setdefault("checks", []).append({"vs": t, "prada_fast": a, "peer": b, "rel_diff": rel,
                                                     "tol": tol, "ok": rel <= tol})


def _gpu_info(s: Session) -> dict:
    """The GPU and its driver (nvidia-smi), where there is one."""
    if s.device != "cuda":
        return {}
    p = torch.cuda.get_device_properties(0)
    info = {"gpu": {"name": p.name, "sms": p.multi_processor_count, "memory_gib": p.total_memory / 2**30,
                    "l2_mib": getattr(p, "L2_cache_size", 0) / 2**20}}
    q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available: {e}"
    return info


RUNNERS = {"env": stage_env, "correct": stage_correct, "op": stage_op, "train": stage_train,
           "maxbatch": stage_maxbatch, "big": stage_big, "tune": stage_tune, "compiled": stage_compiled,
           "peers": stage_peers}


# ----------------------------------------------------------------------------- report
def render(recs: dict) -> str:
    """Markdown of the stages' results, with the issue's targets checked where measured."""
    out = []
    env = recs.get("env")
    ceiling = None
    if env:
        info = env.get("info", {})
        out += ["### Device", "", f"- date: {env['started']}",
                f"- device: {info.get('gpu') or info.get('machine')}",
                f"- nvidia-smi: `{info.get('nvidia_smi', '–')}`",
                f"- versions: {versions_text(info.get('versions') or {})}"]
        for r in env["rows"]:
            if r["what"] == "matmul":
                out.append(f"- matrix product {r['shape']} {r['dtype']}: {r['tflops']:.3g} TFLOP/s")
                ceiling = ceiling or r["tflops"]  # the first: 8192^3 (the square product)
            else:
                out.append(f"- device copy: {r['tb_per_s']:.2f} TB/s (read + write)")
        out.append("")
    if "correct" in recs:
        out += ["### correct", "", md_table(["check", "rc", "summary", "s"], "lllr", (
            [r["check"], r["rc"], r["summary"], f"{r['seconds']:.0f}"] for r in recs["correct"]["rows"])), ""]
    for name in ("op", "compiled", "big", "tune"):
        rows = [r for r in recs.get(name, {}).get("rows", []) if "impl" in r]
        kernel_rows = [r for r in recs.get(name, {}).get("rows", []) if "rows" in r]
        if not rows and not kernel_rows:
            continue
        out += [f"### {name}", ""]
        if rows:
            out += [op_table(rows, vs=("reference", "liger_jsd"), ceiling=ceiling, chunk=True), ""]
        for r in kernel_rows:
            tri, tor = r["triton"], r["torch"]
            out.append(f"- row kernel {r['rows']}: triton {fmt(tri['median_s'], '.4g', unit=' s')} "
                       f"({tri['tb_per_s']:.2f} TB/s), torch {fmt(tor['median_s'], '.4g', unit=' s')} "
                       f"({tor['tb_per_s']:.2f} TB/s); autotuned: {tri.get('configs')}")
        if kernel_rows:
            out.append("")
    if "train" in recs:
        first_loss = ("first loss", lambda r: (r.get("losses") or ["–"])[0])
        attn = ("attn", lambda r: r.get("attn"))
        out += ["### train", "", train_table([{**r, "V": r.get("vocab")} for r in recs["train"]["rows"]],
                                             extra=(first_loss, attn)), ""]
    if "maxbatch" in recs:
        lines = []
        for r in recs["maxbatch"]["rows"]:
            tr = ", ".join(f"{t['batch']}{'' if t['fits'] else ' OOM'}" for t in r["trials"])
            at = [t for t in r["trials"] if t["fits"] and t["batch"] == r["largest_fitting"]]
            lines.append([r["impl"], r["largest_fitting"], r["smallest_failing"],
                          fmt(at[0]["tokens_per_s"] if at else None, ".0f"), tr])
        out += ["### maxbatch", "", md_table(["impl", "largest micro-batch", "smallest failing",
                                              "tokens/s there (1 step)", "trials"], "lrrrl", lines), ""]
    if "peers" in recs:
        out += render_peers(recs["peers"])
    out += targets(recs)
    commands = [c for rec in recs.values() for c in rec.get("commands", [rec.get("command")]) if c]
    if commands:
        out += ["Commands (each run through `bash benchmarks/gpu_session.sh` on the device machine, which",
                "installs the carried wheels first):", ""]
        out += [f"- `{c}`" for c in dict.fromkeys(commands)]
        out.append("")
    for name, rec in recs.items():
        for k in ("not_run", "errors"):
            out += [f"- {name} {k.replace('_', ' ')}: {x[:400]}" for x in rec.get(k, [])]
    return "\n".join(out) + "\n"


def render_peers(rec: dict) -> list[str]:
    """The peers stage: each trainer's real tokens/s and peak GPU memory, against TRL + Liger
    and plain TRL, with the set-up it ran in."""
    from benchmarks.peers import TRAINERS
    info = rec.get("info", {})
    p, sh, v = info.get("peers", {}), info.get("shapes"), info.get("versions") or {}
    out = ["### peers", ""]
    if sh:
        out.append(f"- {p.get('student')} (H {sh['student'][0]}, {sh['student'][1]} layers) from "
                   f"{p.get('teacher')} (H {sh['teacher'][0]}, {sh['teacher'][1]} layers), "
                   f"V = {sh['vocab']}, "
                   f"weights drawn from the configs; {p.get('steps')} steps of {p.get('batch')} sequences "
                   f"(the first {p.get('warmup')} not timed), max length {p.get('max_len')}, data "
                   f"{p.get('data')} ({info.get('n_examples')} labelled examples, byte tokens); "
                   f"{'bf16' if any(r.get('bf16') for r in rec['rows']) else 'fp32'}; KL(p_t || p_s) "
                   "at tau 1 (prada_fast alpha 0; GKD lmbda 0, beta 0)")
    out.append(f"- device: {info.get('gpu') or info.get('machine')}; "
               f"nvidia-smi: `{info.get('nvidia_smi', '–')}`")
    out.append(f"- versions: {versions_text(v)}; started {rec['started']}")
    rows = {r["trainer"]: r for r in rec["rows"]}
    liger, trl = rows.get("trl-gkd-liger"), rows.get("trl-gkd")

    def vs(r, base, key):
        return fmt(r[key] / base[key] if base and r.get(key) and base.get(key) else None, ".2f", unit="x")

    lines = [[TRAINERS[t], fmt(r["tokens_per_s"], ".0f"), vs(r, liger, "tokens_per_s"),
              vs(r, trl, "tokens_per_s"),
              fmt(r.get("gpu_peak_allocated_bytes"), ".0f", scale=1 / MiB, unit=" MiB"),
              vs(r, liger, "gpu_peak_allocated_bytes"),
              fmt(r.get("gpu_peak_reserved_bytes"), ".0f", scale=1 / MiB, unit=" MiB"),
              fmt(r.get("gpu_setup_allocated_bytes"), ".0f", scale=1 / MiB, unit=" MiB"),
              fmt(r.get("maxrss_bytes"), ".0f", scale=1 / MiB, unit=" MiB"),
              f"{r['first_loss']:.6f}", f"{r['last_loss']:.6f}", f"{r['seconds']:.0f}"]
             for t, r in rows.items()]
    if rows:
        out += ["", md_table(["trainer", "real tokens/s", "vs TRL + Liger", "vs TRL", "peak GPU allocated",
                              "vs TRL + Liger", "peak GPU reserved", "GPU allocated before step 1",
                              "peak RSS", "first loss", "last loss", "process s"], "lrrrrrrrrrrr", lines)]
    out.append("")
    for c in rec.get("checks", []):
        out.append(f"- first-batch loss, prada_fast {c['prada_fast']:.6f} vs {TRAINERS[c['vs']]} "
                   f"{c['peer']:.6f}: "
                   f"relative difference {c['rel_diff']:.1e} (tolerance {c['tol']:g}): "
                   f"{'same' if c['ok'] else 'DIFFERENT'}")
    if info.get("topk_cache"):
        out.append(f"- top-k cache built in {info['topk_cache']['seconds']:.0f} s (not in the tokens/s)")
    return out + [""]


def _row_key(r: dict) -> tuple:
    return tuple(str(r.get(k)) for k in ("what", "shape", "check", "case", "impl", "chunk_rows", "rows",
                                         "trainer"))


def targets(recs: dict) -> list[str]:
    """The GPU issue's targets, each met / missed with its number, where measured."""
    lines = []
    gpus = {rec.get("gpu") for rec in recs.values()}
    if len(gpus) > 1:  # a call may land on another kind of machine: no ratios across them
        return ["### Targets", "", f"- records come from different devices ({', '.join(map(str, gpus))}): "
                "ratios not computed; report each device's records apart", ""]

    def check(name, value, limit, *, most=True, fmt="{:.2f}"):
        ok = value <= limit if most else value >= limit
        rel = "<=" if most else ">="
        lines.append(f"- {name}: {fmt.format(value)} (target {rel} {fmt.format(limit)}): "
                     f"{'met' if ok else 'MISSED'}")

    ceiling = next((r["tflops"] for r in recs.get("env", {}).get("rows", []) if r["what"] == "matmul"), None)
    rows = [r for r in recs.get("op", {}).get("rows", []) if r.get("median_s")]
    op = [r for r in rows if "-noteacher" not in r["case"] and "-topk" not in r["case"]]
    topk = [r for r in rows if "-topk" in r["case"]]
    by = {r["impl"]: r for r in op}
    tri = by.get("triton")
    if tri:
        if "liger_jsd" in by:
            check("op time vs Liger fused linear JSD", tri["median_s"] / by["liger_jsd"]["median_s"],
                  TARGETS["vs_liger_jsd"])
        if "reference" in by:
            ref = by["reference"]
            check("op time vs reference", tri["median_s"] / ref["median_s"], TARGETS["vs_reference_time"])
            check("op extra memory vs reference", tri["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1),
                  TARGETS["vs_reference_memory"], fmt="{:.3f}")
        if ceiling:
            check("op matrix rate vs the bf16 matrix-product ceiling", tri["tflops"] / ceiling,
                  TARGETS["of_ceiling"], most=False)
    tk = {r["impl"]: r for r in topk}
    if tri and "triton" in tk:  # no target on a GPU (the cache issue's is the CPU op time)
        lines.append(f"- op time, teacher as top-K log-probabilities vs hidden states + head (triton): "
                     f"{tk['triton']['median_s'] / tri['median_s']:.2f}")
    for r in op + topk:
        if r.get("parity_failures") and r["parity_failures"] != ["not checked"]:
            lines.append(f"- parity {r['impl']} {r['case']}: FAILED {r['parity_failures']}")
    train = {r["impl"]: r for r in recs.get("train", {}).get("rows", []) if r.get("tokens_per_s")}
    if "triton" in train and "reference" in train:
        check("train step tokens/s vs reference", train["triton"]["tokens_per_s"] /
              train["reference"]["tokens_per_s"], TARGETS["train_tokens"], most=False)
    mb = {r["impl"]: r for r in recs.get("maxbatch", {}).get("rows", [])}
    if mb.get("triton", {}).get("largest_fitting") and mb.get("reference", {}).get("largest_fitting"):
        t, r = mb["triton"], mb["reference"]
        check("largest micro-batch vs reference", t["largest_fitting"] / r["largest_fitting"],
              TARGETS["train_batch"], most=False)
        lo = t["largest_fitting"] / (r["smallest_failing"] or r["largest_fitting"])
        hi = (t["smallest_failing"] or t["largest_fitting"]) / r["largest_fitting"]
        lines.append(f"  (the search's steps bound the true ratio to [{lo:.2f}, {hi:.2f}]"
                     f"{'; a search was cut short' if t.get('cut_short') or r.get('cut_short') else ''})")
    for r in recs.get("big", {}).get("rows", []):
        ok = not r.get("oom") and r.get("median_s") and not r.get("parity_failures")
        lines.append(f"- {r['impl']} at {r['case']}: {'ran, parity ok' if ok else 'FAILED'} "
                     f"({fmt(r.get('median_s'), '.4g', unit=' s')}, "
                     f"{fmt(r.get('peak_extra_bytes'), '.0f', scale=1 / MiB, unit=' MiB')} extra)")
    peers = {r["trainer"]: r for r in recs.get("peers", {}).get("rows", []) if r.get("tokens_per_s")}
    if "prada-live" in peers and "trl-gkd-liger" in peers:
        check("end to end real tokens/s vs TRL GKDTrainer + Liger-Kernel (the real pair's shapes)",
              peers["prada-live"]["tokens_per_s"] / peers["trl-gkd-liger"]["tokens_per_s"],
              TARGETS["peers_tokens"], most=False)
        a, b = (peers[t].get("gpu_peak_allocated_bytes") for t in ("prada-live", "trl-gkd-liger"))
        if a and b:  # no target: reported beside the speed
            lines.append(f"- end to end peak GPU memory (allocated) vs TRL GKDTrainer + Liger-Kernel: "
                         f"{a / b:.2f}")
    for r in recs.get("correct", {}).get("rows", []):
        lines.append(f"- {r['check']}: {'passed' if r['rc'] == 0 else 'FAILED'} ({r['summary']})")
    return ["### Targets", "", *lines, ""] if lines else []


def load_records(dirs) -> dict:
    """The stages' records found in `dirs` (stage-*.json), merged per stage: runs split over
    calls (--only) add their rows; a row measured again replaces the earlier one."""
    recs = {}
    files = [p for d in dirs for p in Path(d).glob("stage-*.json")]
    for p in sorted(files, key=lambda p: json.loads(p.read_text())["started"]):
        rec = json.loads(p.read_text())
        have = recs.setdefault(rec["stage"], {**rec, "rows": [], "not_run": [], "errors": []})
        rows = {_row_key(r): r for r in have["rows"]}
        rows.update({_row_key(r): r for r in rec["rows"]})
        have["rows"] = list(rows.values())
        have["not_run"] += rec["not_run"]
        have["errors"] += rec["errors"]
        have.setdefault("commands", [])
        if rec["command"] not in have["commands"]:
            have["commands"].append(rec["command"])
        for k in ("info", "checks"):  # the latest record's
            if k in rec:
                have[k] = rec[k]
    return recs


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.gpu_session", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="+", help=f"{', '.join(STAGES + SECOND)}, smoke [STAGE...], or "
                                             "'report DIR...'")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "out" / "gpu"),
                   help="where the logs and JSON go (default: $OUT, else benchmarks/out/gpu)")
    p.add_argument("--deadline-s", type=float, default=540,
                   help="stop starting new work after this many seconds (the device allows 600 per call)")
    p.add_argument("--update-results", metavar="RESULTS_MD",
                   help="report: also put the markdown into this file's gpu-session block")
    p.add_argument("--only", default="", help="comma-separated implementations (peers: trainers): run just "
                                              "these (e.g. --only triton to split a stage over two calls)")
    a = p.parse_args(argv)
    if a.stages[0] == "report":
        text = render(load_records(a.stages[1:] or [a.out]))
        if a.update_results:
            update_results(Path(a.update_results),
                           f"<!-- results:gpu-session -->\n{text}<!-- /results:gpu-session -->")
        print(text)
        return 0
    smoke = "smoke" in a.stages
    stages = [x for x in a.stages if x != "smoke"] or list(STAGES)  # `smoke` alone: the first command's
    bad = [x for x in stages if x not in RUNNERS]
    if bad:
        p.error(f"unknown stage(s) {bad}: expected {', '.join(STAGES + SECOND)}, smoke or report")
    suffix = f"-{a.only.replace(',', '_')}" if a.only else ""  # [A-Za-z0-9._-] only
    s = Session(Path(a.out), a.deadline_s, smoke, set(filter(None, a.only.split(","))) or None, suffix)
    if s.device != "cuda" and not smoke:
        p.error("no CUDA device here: the stages measure a GPU (run 'smoke' to check the plumbing)")
    only = ["--only", a.only] if a.only else []
    command = " ".join(["python -m benchmarks.tools.gpu_session", *a.stages, *only])
    recs = {}
    for name in stages:
        rec = {"stage": name, "command": command, "started": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), "device": s.device, "rows": [], "not_run": [], "errors": [],
            "gpu": torch.cuda.get_device_name() if s.device == "cuda" else "cpu"}
        t0 = time.monotonic()
        try:
            RUNNERS[name](s, rec)
        except Exception as e:  # a stage's bug must not lose the other stages' results
            rec["errors"].append(f"{type(e).__name__}: {e}")
        rec["seconds"] = time.monotonic() - t0
        s.save(rec)
        recs[name] = rec
    print(render(recs))
    return 1 if any(r["errors"] for r in recs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
