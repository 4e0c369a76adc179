"""prada_fast beside TRL, end to end: the same distillation (student, teacher, data, steps,
micro-batch, max length, fp32, threads, lr, AdamW) once per trainer, one markdown table.

    python -m benchmarks.peers [--student tiny --teacher tiny-teacher] [--steps 12 --batch 16
        --max-len 128 --threads 2 --lr 1e-4 --data synthetic:400:arithmetic,coinflip,lastletter]
        [--cap-mib N | --no-max-batch] [--out benchmarks/out/peers/peers.md]

Models: a preset of prada_fast.models (random weights from its config; the teacher with the
trainer's teacher seed, TeacherSpec.init_seed), one of SHAPES below (config-built, random
weights: speed only; the SmolLM2-135M shape, V = 49152, at 8 and 30 layers), or a local
Hugging Face directory.
Presets and shapes are saved once to OUT_DIR/models/, and every trainer loads the same
directories.

The trainers (each in a child process of its own, `--child SPEC`):
- `prada_fast (live teacher)`: the trainer's own engines and micro-step
  (prada_fast.trainer.engines.build_engines / micro_step: DeepSpeed from ds_configs/zero3.json
  in a world of one, so at ZeRO stage 0 as the trainer runs it (`--one-rank-zero keep`: ZeRO-3
  with the trainer's world-of-one bucket sizes and no second fp32 copy of the student), the
  teacher a plain frozen module; the table lists the settings) on packed
  rows (packing.PackedCollator, the trainer's default), the
  loss op's default implementation, no soft prompt (--prompt-len 0), no domain term
  (--no-domain-loss), gradient checkpointing off (the trainer has none);
- `prada_fast (top-k cache)`: the same, the teacher read from a top-k cache
  (`python -m prada_fast.precompute_teacher --mode topk --k K`, built first and timed apart;
  an approximation of the KD: its loss is not compared);
- `TRL GKDTrainer`: trl.experimental.gkd.GKDTrainer with lmbda = 0 (off-policy: the
  dataset's completions), beta = 0 (forward KL), seq_kd off, its own collator
  (DataCollatorForChatML: left-padded, fed the same token ids with a completion mask),
  gradient checkpointing off, fp32, the sequential sampler (the same batches in the same
  order), a constant lr and AdamW with our betas. GKD has no padding-free or packing path
  (its collator pads; its compute_loss passes input_ids and attention_mask only);
- `TRL GKDTrainer + Liger-Kernel` (use_liger_kernel): on CUDA only; on a CPU it is reported
  as not run (Liger's kernels are Triton GPU kernels).

On CUDA (--device auto or cuda): bf16 unless --dtype fp32 (prada_fast: DeepSpeed's bf16,
fp32 master weights in the optimizer; TRL: bf16=True, autocast over fp32 student weights,
the frozen teacher loaded in bf16), each step's end read after a device synchronisation,
and each trainer's peak GPU memory (torch.cuda.max_memory_allocated / max_memory_reserved
over the whole process) in a second table; the RSS-capped micro-batch search is skipped.
--trainers T,... runs exactly those, in that order (the GPU session's `peers` stage runs
one per process: benchmarks/tools/gpu_session.py).

The objective: GKD's loss is generalized_jsd_loss(student, teacher, labels, beta) at its
default temperature 1 (compute_loss passes no temperature; GKDConfig.temperature is the
sampling temperature of its on-policy generation) with no cross-entropy term, summed over
the completion tokens and divided by their number. prada_fast computes
alpha * CE + (1 - alpha) * tau^2 * KL(p_t || p_s) per token over the same tokens
(docs/design.md), so both run alpha = 0, tau = 1: the same number. The first step's loss
(before any update) is compared, relative difference <= --tol (1e-4; fp32 on the CPU).

Per trainer: real tokens/s (input tokens without padding, of the steps after --warmup,
over their wall time: data collation, forward, backward, optimizer; with --repeats N the
fastest of N runs, the trainers alternating), peak resident memory
(the child's ru_maxrss, as os.wait4 reports it; also its RSS once the models and
optimizer are built, before the first step), the loss of the last step, and the largest
micro-batch that fits under one RSS cap for all trainers (--cap-mib; default 1.5 x the
largest peak of the timed runs): one child per trainer runs 2 steps at each micro-batch from
--batch up, x --max-batch-factor each time (the models and the trainer's set-up built once:
prada_fast's ZeRO-3 engines take any micro-batch, TRL gets a new GKDTrainer per size),
while a thread reads its RSS from /proc every 10 ms and ends it at the cap; the largest size
that ran is the answer (">=" when --max-batch-limit came first).

The children run with OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy) unless the environment
sets it: on a 2-core machine that other jobs share, OpenMP's spinning threads made TRL's
step 5-10x slower at 2 threads (and prada_fast's much less), an artefact of the load, not
of either trainer (benchmarks/RESULTS.md).

Beside the trainers: TRL's `_chunked_divergence_loss` (DistillationTrainer's loss; beta 0,
tau 1) and prada_loss (alpha 0, tau 1) at one micro-batch's shapes (N real tokens,
the models' H, H_t, V): forward + backward time and peak memory above the inputs
(benchmarks.tools.run_case.measure_cpu_peak); and the student's `generate` rate (sampling, KV
cache, as GKD's on-policy branch), from which the cost of on-policy generation per step.

--profile DIR: each trainer's last warm-up step (never a timed one) under torch.profiler:
operators by self CPU time and by the memory they allocate, DIR/TRAINER/top.md (its
allocations add to that process's peak RSS: profile in a run of its own).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out" / "peers"

# Config-built Llama models of SmolLM2-135M's shape (random weights; tied embeddings):
# the real pair of the real-models issue, for speed and memory only.
_SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
             max_position_embeddings=2048)
SHAPES = {"smollm2-shape-l8": {**_SMOL, "num_hidden_layers": 8},
          "smollm2-shape-l30": {**_SMOL, "num_hidden_layers": 30}}

TRAINERS = {"prada-live": "prada_fast (live teacher)", "prada-topk": "prada_fast (top-k cache)",
            "trl-gkd": "TRL GKDTrainer", "trl-gkd-liger": "TRL GKDTrainer + Liger-Kernel"}
EXIT_OVER_CAP = 86


# ----------------------------------------------------------------------------- set-up (parent)
def model_dir(name: str, out: Path, seed: int) -> Path:
    """A local directory holding `name`: a directory as it is; a preset or a shape saved once
    (random weights, seeded) under out/models/."""
    from prada_fast.models import PRESETS, load_causal_lm
    if name not in PRESETS and name not in SHAPES:
        if not Path(name).is_dir():
            sys.exit(f"model {name!r}: not a preset ({', '.join(PRESETS)}), not one of "
                     f"{', '.join(SHAPES)} and not a local model directory")
        return Path(name)
    path = out / "models" / f"{name}-seed{seed}"
    if not (path / "config.json").is_file():
        if name in SHAPES:
            model, tok = load_causal_lm("tiny", config_overrides=SHAPES[name], seed=seed)
        else:
            model, tok = load_causal_lm(name, seed=seed)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def build_examples(args, student: Path) -> list[dict]:
    """The run's examples, encoded as the trainer encodes them (data.format.encode), in one
    seeded order: step i trains on examples[i * batch:(i + 1) * batch] in every trainer."""
    import random

    from prada_fast.data import encode, load_spec, prompt_text
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(student)
    records, _ = load_spec(args.data, seed=args.seed)
    records = [r for r in records if r.labelled]
    domains = {d: i for i, d in enumerate(sorted({r.domain for r in records}))}
    examples = []
    for r in records:
        ex = encode(r, tok, args.max_len, domains[r.domain])
        examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"], "domain": ex["domain"],
                         "prompt": prompt_text(r),
                         "n_labels": sum(1 for y in ex["labels"][1:] if y != -100)})
    random.Random(args.seed).shuffle(examples)
    return examples


def build_topk_cache(args, student: Path, teacher: Path, out: Path, env: dict) -> dict:
    """The top-k cache of the run's data (prada_fast.precompute_teacher), its build time."""
    cache = out / f"cache-topk-k{args.k}"
    cmd = [sys.executable, "-m", "prada_fast.precompute_teacher", "--out", str(cache), "--data", args.data,
           "--student", str(student), "--teacher", str(teacher), "--max-len", str(args.max_len),
           "--eval-per-domain", "0", "--seed", str(args.seed), "--mode", "topk", "--k", str(args.k),
           "--temperature", str(args.temperature), "--no-progress"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return {"path": str(cache), "seconds": round(time.time() - t0, 1)}


def run_child(spec: dict, out: Path, env: dict, timeout: float = 1800, reuse: bool = False) -> dict:
    """One trainer in a fresh process; its result plus its peak RSS (ru_maxrss) and exit code."""
    tag = f"{spec['mode']}-{spec.get('trainer', '')}-b{spec.get('batch', 0)}"
    spec_path, res_path = out / f"spec-{tag}.json", out / f"result-{tag}.json"
    log_path = out / f"log-{tag}.txt"
    full = {**spec, "result": str(res_path)}
    if reuse and not spec.get("probe") and spec_path.is_file() and res_path.is_file() \
            and json.loads(spec_path.read_text()) == full:
        res = json.loads(res_path.read_text())
        if "maxrss_bytes" in res:  # a finished run of the same spec (--reuse)
            return res
    res_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(full))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", "--child", str(spec_path)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res.update(rc=proc.returncode, maxrss_bytes=usage.ru_maxrss * 1024, log=str(log_path))
    if proc.returncode == 0 and not spec.get("probe"):
        res_path.write_text(json.dumps(res))
    if proc.returncode not in (0, EXIT_OVER_CAP) and not spec.get("probe"):
        sys.exit(f"child {tag} exited {proc.returncode}; see {log_path}\n"
                 f"{log_path.read_text()[-4000:]}")
    return res


def tokens_per_s(res: dict, warmup: int) -> float:
    """Real tokens of the steps after `warmup` over their wall time (consecutive step ends)."""
    ends, toks = res["step_ends"], res["tokens"]
    w = min(max(warmup, 1), len(ends) - 1)
    return sum(toks[w:]) / (ends[-1] - ends[w - 1])


def grow_sizes(start: int, limit: int, factor: float) -> list[int]:
    """start, then x factor (at least +1) up to limit."""
    sizes = [start]
    while sizes[-1] < limit:
        sizes.append(min(limit, max(sizes[-1] + 1, int(sizes[-1] * factor))))
    return sizes


def max_batch(spec: dict, out: Path, env: dict, cap: int, start: int, limit: int,
              factor: float, estimate: bool = False) -> tuple[int, str, list]:
    """(largest micro-batch whose 2 steps ran under `cap` bytes of RSS, '>=' when the limit
    was reached first else '', [(batch, VmHWM bytes) per size that ran]): one child per
    trainer runs 2 steps at each size of grow_sizes(start, limit, factor), in one process
    (the models and the trainer's set-up once), while a thread ends it at the cap.
    estimate: 2 steps at start and 2 x start only, and the line through their peaks
    extended to the cap ('~'): for models whose steps take too long for the search."""
    sizes = grow_sizes(start, limit, factor) if not estimate else [start, 2 * start]
    r = run_child({**spec, "mode": "grow", "sizes": sizes, "cap": cap, "probe": True}, out, env)
    done = [(b, hwm) for b, hwm in r.get("grown", []) if hwm <= cap]
    if estimate:  # a line through the peaks at start and 2 x start, to the cap
        if len(done) < 2:  # 2 x start went over the cap: between start and 2 x start - 1
            return start, f"{start}-{2 * start - 1}" if done else f"<{start}", done
        (b0, m0), (b1, m1) = done
        per_seq = max((m1 - m0) / (b1 - b0), 1.0)
        return int(b0 + (cap - m0) / per_seq), "~", done
    if not done:
        return 0, "", []
    best = done[-1][0]
    return best, ">=" if best == sizes[-1] else "", done


# ----------------------------------------------------------------------------- children
def _watch_rss(cap: int) -> None:
    """End this process (exit EXIT_OVER_CAP) as soon as its resident set passes `cap` bytes."""
    page = os.sysconf("SC_PAGE_SIZE")

    def loop():
        while True:
            with open("/proc/self/statm") as f:
                if int(f.read().split()[1]) * page > cap:
                    os._exit(EXIT_OVER_CAP)
            time.sleep(0.01)

    threading.Thread(target=loop, daemon=True).start()


def _rss() -> int:
    from benchmarks.tools.run_case import rss_bytes
    return rss_bytes() or 0


def _batches(examples: list[dict], batch: int, steps: int) -> list[list[dict]]:
    n = len(examples)
    return [[examples[(i * batch + j) % n] for j in range(batch)] for i in range(steps)]


def _hwm() -> int:
    from benchmarks.tools.run_case import hwm_bytes
    return hwm_bytes() or 0


def _cuda_sync() -> None:
    """Wait for the GPU's queued work (a step's end is read on the host clock); no-op on a CPU."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gpu_memory(res: dict, setup_bytes: int | None = None) -> dict:
    """The process's peak GPU memory (torch.cuda.max_memory_allocated / max_memory_reserved,
    the whole run: set-up and steps) added to `res` on CUDA; on a CPU `res` as it is."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        res.update(gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                   gpu_setup_allocated_bytes=setup_bytes, gpu_name=torch.cuda.get_device_name())
    return res


def _gpu_allocated() -> int | None:
    import torch
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def _grown(spec: dict, b: int, grown: list) -> None:
    """Record that 2 steps at micro-batch b ran, with the peak RSS so far (written at once:
    the watchdog may end the process at the next size)."""
    grown.append((b, _hwm()))
    Path(spec["result"]).write_text(json.dumps({"grown": grown}))


class StepProfiler:
    """torch.profiler around one training step of a child (--profile DIR): the last warm-up
    step. Writes DIR/TRAINER/trace.json and DIR/TRAINER/top.md: operators by
    self CPU time and by the memory they allocate themselves (profile_memory)."""

    def __init__(self, spec: dict):
        self.dir = Path(spec["profile"]) / spec["trainer"] if spec.get("profile") else None
        # the last warm-up step (0-based; the first step where there is only one): never a
        # timed step, and after the optimizer state exists
        self.at = max(spec.get("warmup", 1), 1) - 1
        self.prof, self.t0, self.step, self.title = None, 0.0, 0, spec["trainer"]

    def begin(self) -> None:
        if self.dir is not None and self.step == self.at:
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def end(self) -> None:
        if self.prof is not None:
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.write(self.prof, wall)
            self.prof = None
        self.step += 1

    def write(self, prof, wall: float) -> None:
        import torch

        from benchmarks.tools.profiler import top_table
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / "trace.json"))
        events = [e for e in prof.key_averages() if e.self_cpu_memory_usage > 0]
        events.sort(key=lambda e: e.self_cpu_memory_usage, reverse=True)
        total = sum(e.self_cpu_memory_usage for e in events) or 1
        mem = ["| # | name | calls | self allocated MiB | % |", "|---|---|---:|---:|---:|"]
        for i, e in enumerate(events[:20], 1):
            mem.append(f"| {i} | `{e.key[:80]}` | {e.count} | {e.self_cpu_memory_usage / 2**20:.1f} | "
                       f"{100 * e.self_cpu_memory_usage / total:.1f} |")
        text = [f"# {TRAINERS.get(self.title, self.title)}: step {self.at + 1} under torch.profiler", "",
                f"wall time of the profiled step (profiler overhead included): {wall:.2f} s; "
                f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}", "",
                "## Operators by self CPU time", "", top_table(prof, "cpu", rows=25), "",
                f"## Operators by the memory they allocate (sum over the step: {total / 2**20:.0f} MiB; "
                "allocations, not a peak)", "", *mem, ""]
        (self.dir / "top.md").write_text("\n".join(text))


def child_prada(spec: dict) -> dict:
    import torch

    from prada_fast.common import distributed as dist_util
    from prada_fast.common.flags import DEFAULT_DS
    from prada_fast.models import PradaConfig, PradaModel, load_causal_lm
    from prada_fast.teacher.cache import TeacherOutputs
    from prada_fast.trainer.dsconfig import load_ds_config
    from prada_fast.trainer.engines import build_engines, micro_step
    from prada_fast.trainer.packing import PackedCollator

    B, steps = spec["batch"], spec["steps"]
    info = dist_util.setup(10.0)
    cfg = load_ds_config(spec.get("ds") or DEFAULT_DS, world_size=1, device=info.device,
                         max_steps=steps, lr=spec["lr"], one_rank_zero=spec.get("one_rank_zero", "skip"))
    cfg.update(train_batch_size=B, train_micro_batch_size_per_gpu=B, gradient_accumulation_steps=1)
    cfg.pop("scheduler", None)  # a constant lr, as TRL's run
    if spec.get("dtype") == "fp32":  # bf16 is DeepSpeed's "auto" on CUDA; --dtype fp32 turns it off
        cfg.setdefault("bf16", {})["enabled"] = False
    torch.manual_seed(spec["seed"])
    student, tok = load_causal_lm(spec["student"])
    examples = json.loads(Path(spec["examples"]).read_text())
    n_domains = max(ex["domain"] for ex in examples) + 1
    model = PradaModel(student, PradaConfig(n_domains=n_domains, n_prompt=0))  # no domain term runs
    teacher = None if spec["trainer"] == "prada-topk" else load_causal_lm(spec["teacher"])[0]
    engine, teacher_source = build_engines(model, teacher, cfg)  # a LiveTeacher, or None
    if spec["trainer"] == "prada-topk":
        teacher_source = TeacherOutputs(Path(spec["cache"]))
    collate = PackedCollator(tok.pad_token_id, 0, spec["max_len"])
    losses, step_ends, tokens = [], [], []

    prof = StepProfiler(spec)

    def train(batches):
        for batch in batches:
            prof.begin()
            mb = collate(batch)
            loss, _ = micro_step(engine, teacher_source, mb, norm=max(sum(ex["n_labels"] for ex in batch), 1),
                                 lam=0.0, temperature=spec["temperature"], alpha=spec["alpha"],
                                 use_domain=False)
            losses.append(float(loss.detach()))
            _cuda_sync()
            prof.end()
            step_ends.append(time.perf_counter())
            tokens.append(int(mb["attention_mask"].sum()))

    rss_setup, gpu_setup = _rss(), _gpu_allocated()
    t0 = time.perf_counter()
    if spec["mode"] == "grow":  # ZeRO-3 does not fix the micro-batch: the same engines
        grown = []
        for b in spec["sizes"]:
            train(_batches(examples, b, 2))
            _grown(spec, b, grown)
        return {"grown": grown}
    train(_batches(examples, B, steps))
    settings = {"zero_optimization": cfg["zero_optimization"],
                "teacher": type(teacher_source).__name__ if teacher_source is not None else None,
                "teacher_holder": type(getattr(teacher_source, "engine", None)).__name__}
    res = _gpu_memory({"losses": losses, "step_ends": step_ends, "t0": t0, "tokens": tokens,
                       "rss_setup_bytes": rss_setup, "padding_fraction": None,
                       "bf16": bool(cfg.get("bf16", {}).get("enabled")), "settings": settings},
                      gpu_setup)
    dist_util.teardown()
    return res


def child_trl(spec: dict) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(spec["seed"])
    # bf16 (CUDA, unless --dtype fp32): mixed precision, the student's weights fp32 (the
    # optimizer's master copy, as DeepSpeed's bf16 mode keeps one) under autocast, the frozen
    # teacher in bf16 (no master copy needed; prada_fast's is bf16 under DeepSpeed too)
    bf16 = torch.cuda.is_available() and spec.get("dtype") != "fp32"
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], **load)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], **{
        **load, "dtype": torch.bfloat16 if bf16 else torch.float32})
    tok = AutoTokenizer.from_pretrained(spec["student"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples = json.loads(Path(spec["examples"]).read_text())
    liger = spec["trainer"] == "trl-gkd-liger"
    step_ends, losses = [], []

    prof = StepProfiler(spec)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            prof.begin()

        def on_step_end(self, args, state, control, **kw):
            _cuda_sync()
            prof.end()
            step_ends.append(time.perf_counter())

    class RecordingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    def trainer_for(B: int, steps: int):
        rows = []
        for batch in _batches(examples, B, steps):  # the same batches, in order (sequential sampler)
            for ex in batch:
                n_prompt = sum(1 for y in ex["labels"] if y == -100)
                rows.append({"prompt": ex["prompt"], "input_ids": ex["input_ids"],
                             "completion_mask": [0] * n_prompt + [1] * (len(ex["input_ids"]) - n_prompt)})
        args = GKDConfig(
            output_dir=tempfile.mkdtemp(prefix="peers-trl-"), per_device_train_batch_size=B, max_steps=steps,
            learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
            lmbda=0.0, beta=0.0, seq_kd=False, temperature=spec["temperature"], max_length=spec["max_len"],
            gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=not torch.cuda.is_available(),
            use_liger_kernel=liger, train_sampling_strategy="sequential", dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=spec["seed"])
        return RecordingGKD(model=student, teacher_model=teacher, args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])

    if spec["mode"] == "grow":  # a new trainer (and optimizer) per size, the same models
        import gc
        grown = []
        for b in spec["sizes"]:
            trainer = trainer_for(b, 2)
            trainer.train()
            del trainer
            student.zero_grad(set_to_none=True)
            gc.collect()
            _grown(spec, b, grown)
        return {"grown": grown}
    B, steps = spec["batch"], spec["steps"]
    trainer = trainer_for(B, steps)
    rss_setup, gpu_setup = _rss(), _gpu_allocated()
    t0 = time.perf_counter()
    trainer.train()
    tokens = [sum(len(ex["input_ids"]) for ex in batch) for batch in _batches(examples, B, steps)]
    return _gpu_memory({"losses": losses, "step_ends": step_ends, "t0": t0, "tokens": tokens,
                        "rss_setup_bytes": rss_setup, "bf16": bf16,
                        "settings": {"gradient_checkpointing": trainer.args.gradient_checkpointing,
                                     "padding_free": getattr(trainer.args, "padding_free", None),
                                     "packing": getattr(trainer.args, "packing", None),
                                     "collator": type(trainer.data_collator).__name__,
                                     "optim": str(trainer.args.optim)}}, gpu_setup)


def child_op(spec: dict) -> dict:
    """TRL's _chunked_divergence_loss beside prada_loss at one micro-batch's shapes, and the
    student's generate rate."""
    import torch

    from benchmarks.tools.run_case import measure_cpu_peak
    from prada_fast import prada_loss
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    g = torch.Generator().manual_seed(spec["seed"])
    N, H, Ht, V = spec["N"], spec["H"], spec["Ht"], spec["V"]
    h = (torch.randn(N, H, generator=g)).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    ht = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.02
    y = torch.randint(0, V, (1, N), generator=g)
    tau = spec["temperature"]

    def ours():
        loss, _ = prada_loss(h[None], w, y, teacher_hidden=ht[None], teacher_weight=wt, alpha=0.0,
                             temperature=tau)
        loss.backward()
        return float(loss)

    def trl():
        loss, _, _ = _chunked_divergence_loss(h[None], ht[None], w, wt, torch.ones(1, N), beta=0.0,
                                              temperature=tau)
        loss.backward()
        return float(loss)

    out = {}
    for name, fn in (("prada_loss (chunked)", ours), ("TRL _chunked_divergence_loss", trl)):
        times, value = [], None
        for i in range(1 + spec["repeats"]):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            value = fn()
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = {"loss": value, "median_s": statistics.median(times)}
    for name, fn in (("prada_loss (chunked)", ours), ("TRL _chunked_divergence_loss", trl)):
        h.grad = w.grad = None
        _, peak, how = measure_cpu_peak(fn)
        out[name].update(peak_bytes=int(peak), mem_method=how)

    # on-policy generation: the student samples completions (KV cache), as GKD's lmbda > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(spec["student"])
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = spec["prompts"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    new = spec["new_tokens"]
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0, top_p=1.0,
              temperature=1.0, pad_token_id=tok.pad_token_id, use_cache=True)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=True, top_k=0,
                       pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        model.generate(**enc, **kw)
        gen_s = time.perf_counter() - t0
    out["generate"] = {"sequences": len(prompts), "new_tokens": new, "seconds": gen_s,
                       "tokens_per_s": len(prompts) * new / gen_s}
    return out


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    torch.set_num_threads(spec["threads"])
    if spec.get("cap"):
        _watch_rss(spec["cap"])
    if spec["mode"] == "op":
        res = child_op(spec)
    elif spec["trainer"].startswith("prada"):
        res = child_prada(spec)
    else:
        res = child_trl(spec)
    res["threads"] = torch.get_num_threads()
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------- the run
def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("prada-fast", "torch", "transformers", "trl", "deepspeed", "liger-kernel", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def run(args) -> dict:
    import torch
    out = Path(args.out).resolve().parent if args.out else OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # the checkout first, then what the caller's PYTHONPATH holds (a GPU machine's carried wheels)
    env.update(OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
               PRADA_FAST_CACHE=str(out / "fit-cache"))
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not on_gpu:
        sys.exit("--device cuda: no CUDA device here")
    if not on_gpu and torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine
    if args.omp_wait_policy and "OMP_WAIT_POLICY" not in os.environ:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    t_start = time.time()
    vers = versions()
    have_trl = vers["trl"] is not None
    student = model_dir(args.student, out, args.seed)
    from prada_fast.teacher.resolve import TeacherSpec
    teacher = model_dir(args.teacher, out, TeacherSpec(seed=args.seed).init_seed)
    examples = build_examples(args, student)
    ex_path = out / "examples.json"
    ex_path.write_text(json.dumps(examples))
    from transformers import AutoConfig
    s_cfg, t_cfg = AutoConfig.from_pretrained(student), AutoConfig.from_pretrained(teacher)
    load_before = os.getloadavg()[0]

    base = {"mode": "train", "student": str(student), "teacher": str(teacher), "examples": str(ex_path),
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
            "threads": args.threads, "max_len": args.max_len, "seed": args.seed, "alpha": 0.0,
            "temperature": args.temperature, "ds": args.ds, "one_rank_zero": args.one_rank_zero,
            "dtype": args.dtype,
            "profile": str(Path(args.profile).resolve()) if args.profile else None}
    trainers = ["prada-live"] + (["prada-topk"] if args.k else []) + (["trl-gkd"] if have_trl else [])
    if have_trl and on_gpu:
        trainers.append("trl-gkd-liger")
    if args.trainers:  # exactly these, in this order (TRL + Liger on a CPU too, if asked for)
        trainers = args.trainers.split(",")
        bad = [t for t in trainers if t not in TRAINERS]
        if bad or ("prada-topk" in trainers and not args.k):
            sys.exit(f"--trainers: {bad or 'prada-topk needs --k > 0'} (known: {', '.join(TRAINERS)})")
    cache = build_topk_cache(args, student, teacher, out, env) if "prada-topk" in trainers else None
    results = {}
    if args.parallel:  # every trainer at once: the losses only (the timings share the cores)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(trainers)) as pool:
            futures = {t: pool.submit(run_child, {**base, "trainer": t, "cache": cache and cache["path"]},
                                      out, env) for t in trainers}
        done = {t: f.result() for t, f in futures.items()}
    for _rep in range(args.repeats):  # trainers alternate; each keeps its fastest run
        for t in trainers:
            spec = {**base, "trainer": t, "cache": cache and cache["path"]}
            r = done[t] if args.parallel else run_child(spec, out, env, reuse=args.reuse)
            r["tokens_per_s"] = tokens_per_s(r, args.warmup)
            r["tokens_per_s_runs"] = results.get(t, {}).get("tokens_per_s_runs", []) + [r["tokens_per_s"]]
            if t not in results or r["tokens_per_s"] > results[t]["tokens_per_s"]:
                results[t] = r
            results[t]["tokens_per_s_runs"] = r["tokens_per_s_runs"]
            print(f"{TRAINERS[t]}: {r['tokens_per_s']:.0f} real tokens/s, peak RSS {mib(r['maxrss_bytes'])}, "
                  f"first loss {r['losses'][0]:.6f}, last loss {r['losses'][-1]:.6f}", flush=True)

    check = None
    if "trl-gkd" in results and "prada-live" in results:
        a, b = results["prada-live"]["losses"][0], results["trl-gkd"]["losses"][0]
        rel = abs(a - b) / max(abs(b), 1e-30)
        check = {"prada_fast": a, "trl_gkd": b, "rel_diff": rel, "tol": args.tol, "ok": rel <= args.tol}
        print(f"first-batch loss: prada_fast {a:.8f}, TRL GKD {b:.8f}, relative difference {rel:.2e} "
              f"(tolerance {args.tol:g}): {'same' if check['ok'] else 'DIFFERENT'}", flush=True)

    cap = None
    if args.max_batch and results and on_gpu:
        print("micro-batch search skipped: its cap is on the resident set (CPU memory)", flush=True)
    elif args.max_batch and len(results) > 0:
        cap = int(args.cap_mib * 2**20) if args.cap_mib else \
            int(1.5 * max(r["maxrss_bytes"] for r in results.values()))
        for t, r in results.items():
            spec = {**base, "trainer": t, "cache": cache and cache["path"]}
            b, qual, grown = max_batch(spec, out, env, cap, args.batch, args.max_batch_limit,
                                       args.max_batch_factor, args.max_batch_estimate)
            r["max_batch"], r["max_batch_qual"], r["max_batch_grown"] = b, qual, grown
            shown = qual if qual[:1].isdigit() or qual[:1] == "<" else f"{qual}{b}"
            print(f"{TRAINERS[t]}: largest micro-batch under {mib(cap)}: {shown} "
                  f"(ran: {', '.join(f'{x} ({mib(h)})' for x, h in grown)})", flush=True)

    op = None
    if have_trl and args.op:
        n_tok = sum(sum(len(ex["input_ids"]) for ex in examples[i * args.batch:(i + 1) * args.batch])
                    for i in range(1)) if examples else 0
        mean_completion = statistics.mean(len(ex["input_ids"]) - sum(1 for y in ex["labels"] if y == -100)
                                          for ex in examples)
        spec = {"mode": "op", "N": n_tok, "H": s_cfg.hidden_size, "Ht": t_cfg.hidden_size,
                "V": s_cfg.vocab_size, "temperature": args.temperature, "seed": args.seed, "repeats": 3,
                "threads": args.threads, "student": str(student),
                "prompts": [ex["prompt"] for ex in examples[:args.batch]],
                "new_tokens": max(1, round(mean_completion))}
        op = run_child(spec, out, env)
        op["shape"] = {k: spec[k] for k in ("N", "H", "Ht", "V")}
        op["mean_completion"] = mean_completion

    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": vers,
               "command": "python -m benchmarks.peers " + " ".join(args.argv),
               "machine": f"{os.cpu_count()} CPUs, load average {load_before:.1f} before the runs, "
                          f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}",
               "device": "cuda" if on_gpu else "cpu", "student": args.student, "teacher": args.teacher,
               "shapes": {"student": [s_cfg.hidden_size, s_cfg.num_hidden_layers],
                          "teacher": [t_cfg.hidden_size, t_cfg.num_hidden_layers], "vocab": s_cfg.vocab_size},
               "n_examples": len(examples), "cache": cache, "cap_bytes": cap, "check": check, "op": op,
               "wall_s": round(time.time() - t_start, 1),
               "trainers": results,
               "trl_missing": not have_trl, "liger_run": "trl-gkd-liger" in results,
               "args": {k: v for k, v in vars(args).items()}}
    return summary


def _precision(s: dict) -> str:
    bf16 = [r.get("bf16") for r in s["trainers"].values()]
    if not any(bf16):
        return "fp32"
    return ("bf16 (prada_fast: DeepSpeed bf16; TRL: bf16=True, autocast over fp32 student weights, "
            "teacher in bf16)")


def gpu_table(rows: dict) -> list[str]:
    """Markdown lines: real tokens/s and peak GPU memory per trainer, against TRL + Liger
    (else TRL) where it ran."""
    base = rows.get("trl-gkd-liger") or rows.get("trl-gkd")
    name = TRAINERS["trl-gkd-liger" if "trl-gkd-liger" in rows else "trl-gkd"]
    out = [f"| trainer ({next(iter(rows.values())).get('gpu_name', 'GPU')}) | real tokens/s | vs {name} | "
           f"peak GPU allocated | vs {name} | peak GPU reserved | GPU allocated before step 1 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t, r in rows.items():
        vs_t = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        vs_m = f"{r['gpu_peak_allocated_bytes'] / base['gpu_peak_allocated_bytes']:.2f}x" if base else "-"
        out.append(f"| {TRAINERS[t]} | {r['tokens_per_s']:.0f} | {vs_t} | "
                   f"{mib(r['gpu_peak_allocated_bytes'])} | {vs_m} | {mib(r['gpu_peak_reserved_bytes'])} | "
                   f"{mib(r['gpu_setup_allocated_bytes'] or 0)} |")
    return out


def table(s: dict, args) -> str:
    sh = s["shapes"]
    lines = [f"{s['student']} (H {sh['student'][0]}, {sh['student'][1]} layers) from {s['teacher']} "
             f"(H {sh['teacher'][0]}, {sh['teacher'][1]} layers), V = {sh['vocab']}; {args.steps} steps "
             f"at micro-batch {args.batch}, max length {args.max_len}, {args.threads} threads, "
             f"{_precision(s)}, "
             f"lr {args.lr:g} (constant), AdamW; objective KL(p_t || p_s) at tau {args.temperature:g} "
             f"(prada_fast alpha 0; GKD lmbda 0, beta 0); data {args.data}; {s['date']}; "
             f"{s['machine']}.", ""]
    cap = s["cap_bytes"]
    lines.append(f"| trainer | real tokens/s | vs TRL | peak RSS | vs TRL | RSS before step 1 | "
                 f"largest micro-batch under {mib(cap) if cap else '(not measured)'} | first loss | "
                 f"loss after {args.steps} steps |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    trl = s["trainers"].get("trl-gkd")
    for t, r in s["trainers"].items():
        vs_t = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
        vs_m = f"{r['maxrss_bytes'] / trl['maxrss_bytes']:.2f}x" if trl else "-"
        qual = r.get("max_batch_qual", "")
        mb = "-" if "max_batch" not in r else qual if qual[:1].isdigit() or qual[:1] == "<" \
            else f"{qual}{r['max_batch']}"
        lines.append(f"| {TRAINERS[t]} | {r['tokens_per_s']:.0f} | {vs_t} | {mib(r['maxrss_bytes'])} | "
                     f"{vs_m} | {mib(r['rss_setup_bytes'])} | {mb} | {r['losses'][0]:.6f} | "
                     f"{r['losses'][-1]:.6f} |")
    if not s["liger_run"]:
        lines.append(f"| {TRAINERS['trl-gkd-liger']} | not run | | | | | | | |")
    lines.append("")
    for t, r in s["trainers"].items():  # what each row ran with (older JSON files have none)
        st = r.get("settings")
        if not st:
            continue
        if "zero_optimization" in st:
            z = st["zero_optimization"]
            keys = ("reduce_bucket_size", "sub_group_size", "contiguous_gradients", "overlap_comm",
                    "stage3_param_persistence_threshold")
            teacher = {"FrozenTeacher": "a plain frozen module (a world of one)",
                       "DeepSpeedEngine": "a ZeRO-3 inference engine"}.get(st.get("teacher_holder"),
                                                                           st.get("teacher") or "none")
            stage = z.get("stage", 3)
            zero = "ZeRO stage 0 (a world of one: nothing to partition)" if stage == 0 else \
                f"ZeRO-{stage} " + ", ".join(f"{k} {z.get(k, '(DeepSpeed default)')}" for k in keys)
            lines.append(f"{TRAINERS[t]}: {zero}; teacher: {teacher}.")
        else:
            lines.append(f"{TRAINERS[t]}: collator {st['collator']}, gradient checkpointing "
                         f"{st['gradient_checkpointing']}, padding_free {st['padding_free']}, packing "
                         f"{st['packing']} (GKD's compute_loss passes input_ids and attention_mask "
                         f"only: no padding-free path), optimizer {st['optim']}.")
    gpu = {t: r for t, r in s["trainers"].items() if r.get("gpu_peak_allocated_bytes") is not None}
    if gpu:  # CUDA: the GPU's peaks beside the tokens/s (the peak RSS above is host memory)
        lines += gpu_table(gpu) + [""]
    if s["trl_missing"]:
        lines.append("TRL is not installed (`pip install -e \".[peers]\"`): only prada_fast ran.")
    if not s["liger_run"]:
        lines.append("TRL + Liger-Kernel (`use_liger_kernel=True`) not run: Liger-Kernel's kernels are "
                     "Triton GPU kernels and this machine has no GPU.")
    c = s["check"]
    if c:
        lines.append(f"Same work: first-batch loss prada_fast {c['prada_fast']:.8f}, "
                     f"TRL GKD {c['trl_gkd']:.8f}, "
                     f"relative difference {c['rel_diff']:.1e} (tolerance {c['tol']:g}): "
                     f"{'same' if c['ok'] else 'DIFFERENT'}.")
    if s["cache"]:
        lines.append(f"Top-k cache (K = {args.k}): built in {s['cache']['seconds']:.0f} s (teacher pass over "
                     f"all {s['n_examples']} examples, process start included), not in the table's "
                     "tokens/s; its loss is the top-k approximation of the KD.")
    if cap and args.max_batch_estimate:
        lines.append(f"Largest micro-batch (estimated, '~'): one process per trainer runs 2 steps at "
                     f"micro-batch {args.batch} and at {2 * args.batch}; the line through their peak RSS, "
                     f"extended to the cap ({mib(cap)}, the same for every trainer).")
    elif cap:
        lines.append(f"Largest micro-batch: one process per trainer runs 2 steps at each micro-batch "
                     f"from {args.batch} up, x {args.max_batch_factor:g} each time (limit "
                     f"{args.max_batch_limit}), until a watchdog thread reading its RSS every 10 ms ends "
                     f"it at the cap ({mib(cap)}, the same for every trainer).")
    op = s["op"]
    if op:
        shp = op["shape"]
        lines += ["", f"The loss functions alone, forward + backward, N = {shp['N']} (one micro-batch's "
                  f"tokens), H = {shp['H']}, H_t = {shp['Ht']}, V = {shp['V']}, fp32, {args.threads} threads "
                  "(KL at the same tau; median of 3 after one warm-up; peak memory above the inputs):", "",
                  "| loss | time | peak extra memory | loss value |", "| --- | ---: | ---: | ---: |"]
        for name in ("prada_loss (chunked)", "TRL _chunked_divergence_loss"):
            o = op[name]
            lines.append(f"| {name} | {o['median_s'] * 1e3:.1f} ms | {mib(o['peak_bytes'])} | "
                         f"{o['loss']:.6f} |")
        gen = op["generate"]
        per_step = gen["sequences"] * gen["new_tokens"] / gen["tokens_per_s"]
        tail = "."
        if trl:
            step_s = statistics.mean(trl["tokens"]) / trl["tokens_per_s"]
            tail = f", whose {args.batch}-sequence micro-batch takes {step_s:.2f} s in TRL GKD."
        lines += ["", "On-policy generation (DistillationTrainer, or GKD with lmbda > 0): the student "
                  f"samples {gen['sequences']} completions of {gen['new_tokens']} tokens (the data's mean "
                  f"completion) at {gen['tokens_per_s']:.0f} tokens/s (KV cache, fp32): {per_step:.2f} s "
                  "per step on top of the training step" + tail]
    lines.append(f"\nWall time of the whole benchmark: {s['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="tiny",
                   help="preset, shape (%s) or local directory" % ", ".join(SHAPES))
    p.add_argument("--teacher", default="tiny-teacher")
    p.add_argument("--data", default="synthetic:400:arithmetic,coinflip,lastletter")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=16, help="micro-batch (sequences per optimizer step)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="tau of both losses (GKD's loss runs at 1 whatever its config says: keep 1 for "
                        "the same objective)")
    p.add_argument("--k", type=int, default=32, help="K of the top-k cache (0: no cached-teacher run)")
    p.add_argument("--ds", default=None, help="prada_fast's DeepSpeed config (default ds_configs/zero3.json)")
    p.add_argument("--one-rank-zero", choices=("skip", "keep"), default="skip",
                   help="the trainer's flag of that name: 'skip' (its default) trains this world of one at "
                        "ZeRO stage 0, 'keep' at the config's stage (ZeRO-3)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per trainer, alternating; the table keeps each one's fastest")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the children unless the environment sets one ('' leaves "
                        "OpenMP's default): PASSIVE, because with spinning threads on a 2-core machine "
                        "that other jobs share, a step of transformers' eager path (TRL) ran 5-10x slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the trainers run (auto: CUDA where available)")
    p.add_argument("--dtype", choices=("auto", "fp32"), default="auto",
                   help="auto: bf16 on CUDA (prada_fast: DeepSpeed's bf16; TRL: bf16=True, the "
                        "student's weights fp32 under autocast, the teacher bf16), fp32 on a CPU")
    p.add_argument("--trainers", default="",
                   help=f"comma-separated, run in this order: {', '.join(TRAINERS)} (default: those "
                        "that can run here)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the first-batch loss check")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false")
    p.add_argument("--cap-mib", type=float, default=None, help="RSS cap of the micro-batch search")
    p.add_argument("--max-batch-limit", type=int, default=512)
    p.add_argument("--max-batch-factor", type=float, default=1.25,
                   help="growth of the micro-batch between the sizes of the search")
    p.add_argument("--max-batch-estimate", action="store_true",
                   help="no search: peaks at --batch and 2 x --batch, a line through them to the cap")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the timed runs already in OUT's folder whose spec is the same")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="profile each trainer's last warm-up step under torch.profiler (time and "
                        "allocations by operator): DIR/TRAINER/top.md and trace.json")
    p.add_argument("--no-op", dest="op", action="store_false", help="skip the loss-function comparison")
    p.add_argument("--out", default=str(OUT_DIR / "peers.md"), help="markdown table (JSON beside it)")
    p.add_argument("--parallel", action="store_true",
                   help="run the trainers at the same time (a quick loss check: timings not comparable)")
    p.add_argument("--render", metavar="JSON", help="only write the table again from a run's JSON")
    args = p.parse_args(argv)
    args.argv = argv
    if args.render:
        s = json.loads(Path(args.render).read_text())
        args = argparse.Namespace(**{**vars(args), **s.get("args", {}), "out": args.out})
    else:
        s = run(args)
    text = table(s, args)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(s, indent=2) + "\n")
    return 0 if not s["check"] or s["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
