"""Profile one call of the loss op, or one training step, under torch.profiler.

    python -m prada_fast.profile op --impl chunked --N 2048 --H 512 --V 32000 [--Ht 512] --out prof/
    python -m prada_fast.profile step --loss-impl chunked [--student tiny --teacher tiny-teacher
        --vocab 32000 --batch 8 --seq 256] --out prof/

Writes OUT/trace.json (a Chrome trace: chrome://tracing or https://ui.perfetto.dev) and
OUT/top_kernels.md (operators, and on CUDA the kernels, by self time). One untimed call
runs first (compilation, allocator warm-up). --bare runs the calls without torch.profiler,
for Nsight Compute / Nsight Systems: the commands are in benchmarks/README.md.

`build_train_step` is also the training-step benchmark's harness (benchmarks/train_step.py):
student + frozen teacher under DeepSpeed ZeRO-3 in a world of one, one optimizer step per
call on a fixed random batch, the trainer's own forward (PradaModel) and teacher pass.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- the op
def op_inputs(N: int, H: int, V: int, Ht: int = 0, *, dtype: str = "float32", device="cpu",
              n_domains: int = 4, seed: int = 0) -> dict:
    """Random arguments of `prada_loss` for N rows (sequences of up to 1024 tokens)."""
    T = min(N, 1024)
    while N % T:
        T -= 1
    B = N // T
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    dt = DTYPES[dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    x = {"hidden": randn(B, T, H).requires_grad_(),
         "lm_weight": randn(V, H, scale=2 / math.sqrt(H)).requires_grad_(),
         "targets": torch.randint(0, V, (B, T), generator=g, device=dev)}
    if Ht:
        x["teacher_hidden"] = randn(B, T, Ht)
        x["teacher_weight"] = randn(V, Ht, scale=2 / math.sqrt(Ht))
    if n_domains:
        x["domain_weight"] = randn(n_domains, H, scale=1 / math.sqrt(H)).requires_grad_()
        x["domain_bias"] = randn(n_domains).requires_grad_()
        x["domain_labels"] = torch.randint(0, n_domains, (B,), generator=g, device=dev)
    return x


def op_step(x: dict, impl: str, **kw):
    """One forward + backward of prada_loss on x; returns the loss."""
    from .loss import prada_loss
    for k in ("hidden", "lm_weight", "domain_weight", "domain_bias"):
        if k in x:
            x[k].grad = None
    args = {k: v for k, v in x.items() if k not in ("hidden", "lm_weight", "targets")}
    loss, _ = prada_loss(x["hidden"], x["lm_weight"], x["targets"], impl=impl, **args, **kw)
    loss.backward()
    return loss


# ----------------------------------------------------------------------------- the training step
def build_train_step(*, student: str = "tiny", teacher: str = "tiny-teacher", vocab: int = 32000,
                     batch: int = 8, seq: int = 256, loss_impl: str = "auto", ds_config=None,
                     n_domains: int = 4, prompt_len: int = 8, target_frac: float = 0.25,
                     seed: int = 0):
    """A function step() -> (loss, tokens) running one ZeRO-3 optimizer step of student +
    teacher on a fixed random batch, and a dict describing the set-up. step.for_batch(b)
    gives the same step on a batch of b sequences.

    student / teacher: presets (random weights from their configs) or local model
    directories; vocab > 0 replaces a preset's vocabulary (the byte vocabulary of the tiny
    presets has 259 ids, too few for the loss to matter). The batch: `batch` sequences of
    `seq` tokens; a quarter of each sequence is the question (no target) and `target_frac`
    of the sequences are unlabelled target-domain rows (domain loss only), as in PRADA."""
    import deepspeed
    from deepspeed import zero

    from . import distributed as dist_util
    from .cli import DEFAULT_DS
    from .dsconfig import inference_config, load_ds_config
    from .model import PRESETS, PradaModel, check_same_vocab, load_causal_lm
    from .trainloop import _teacher_hidden

    info = dist_util.setup(10.0)
    cfg = load_ds_config(ds_config or DEFAULT_DS, world_size=info.world_size, device=info.device,
                         max_steps=1000)
    cfg.update(train_batch_size=batch * info.world_size, train_micro_batch_size_per_gpu=batch,
               gradient_accumulation_steps=1)

    def load(name, s):
        if vocab and name in PRESETS and PRESETS[name].get("vocab_size") != vocab:
            key = f"{name}@vocab{vocab}"
            PRESETS[key] = {**PRESETS[name], "vocab_size": vocab}
            try:
                return load_causal_lm(key, seed=s)[0]
            finally:
                del PRESETS[key]
        return load_causal_lm(name, seed=s)[0]

    torch.manual_seed(seed)
    s_model = load(student, seed)
    V = s_model.get_output_embeddings().weight.shape[0]
    model = PradaModel(s_model, n_domains, prompt_len, "linear", 0, loss_impl)
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    t_engine = None
    if teacher and teacher != "none":
        t_model = load(teacher, seed + 7)
        check_same_vocab(s_model, t_model)
        t_model.requires_grad_(False)
        t_model.eval()
        t_engine, *_ = deepspeed.initialize(model=t_model, config=inference_config(cfg))
        t_engine.eval()

    dev = engine.device

    def for_batch(b: int):
        """A step() on a fixed random batch of b sequences (same engines: ZeRO-3 does not
        fix the batch size, so a search for the largest batch needs no new process)."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, V, (b, seq), generator=g)
        mask = torch.ones(b, seq, dtype=torch.long)
        labels = ids.clone()
        labels[:, : seq // 4] = -100                       # the question: no target
        n_target = int(round(b * target_frac))
        if n_target:
            labels[b - n_target:] = -100                   # unlabelled target-domain sequences
        doms = torch.arange(b) % n_domains
        mb = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev),
              "domain_labels": doms.to(dev)}
        n_valid = int((labels[:, 1:] != -100).sum())
        tokens = int(mask.sum())

        def step():
            th, tw = _teacher_hidden(t_engine, mb, dev)
            with zero.GatheredParameters([tw] if tw is not None else [], modifier_rank=None):
                loss, _ = engine(mb["input_ids"], mb["attention_mask"], mb["labels"], mb["domain_labels"],
                                 teacher_hidden=th, teacher_weight=tw, grl_lambda=0.5,
                                 num_valid_tokens=max(n_valid, 1), temperature=1.0, alpha=0.5)
            engine.backward(loss)
            engine.step()
            return float(loss.detach()), tokens

        step.n_valid, step.tokens = n_valid, tokens
        return step

    step = for_batch(batch)
    step.for_batch = for_batch
    n_valid, tokens = step.n_valid, step.tokens

    desc = {"student": student, "teacher": teacher, "vocab": V, "batch": batch, "seq": seq,
            "tokens_per_step": tokens, "loss_rows_per_step": n_valid, "loss_impl": loss_impl,
            "device": str(dev), "bf16": bool(cfg.get("bf16", {}).get("enabled")),
            "zero_stage": cfg.get("zero_optimization", {}).get("stage"),
            "student_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            "attn": getattr(s_model.config, "_attn_implementation", None)}
    return step, desc


# ----------------------------------------------------------------------------- profiling
def _attr(ev, *names):
    for n in names:
        v = getattr(ev, n, None)
        if v is not None:
            return v
    return 0


def top_table(prof, device_type: str, rows: int = 30) -> str:
    """Markdown table of the operators / kernels with the most self time."""
    on_gpu = device_type == "cuda"
    events = list(prof.key_averages())
    key_dev = ("self_device_time_total", "self_cuda_time_total")
    key = (lambda e: _attr(e, *key_dev)) if on_gpu else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    events.sort(key=key, reverse=True)
    head = "| # | name | calls | self {0} ms | % | total {0} ms |".format("CUDA" if on_gpu else "CPU")
    lines = [head + (" self CPU ms |" if on_gpu else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if on_gpu else "")]
    for i, e in enumerate(events[:rows], 1):
        tot = _attr(e, "device_time_total", "cuda_time_total") if on_gpu else e.cpu_time_total
        name = e.key.replace("|", "\\|")
        if len(name) > 90:
            name = name[:87] + "..."
        row = (f"| {i} | `{name}` | {e.count} | {key(e) / 1e3:.2f} | {100 * key(e) / total:.1f} "
               f"| {tot / 1e3:.2f} |")
        lines.append(row + (f" {e.self_cpu_time_total / 1e3:.2f} |" if on_gpu else ""))
    return "\n".join(lines)


def profile(fn, out: Path, device: torch.device, title: str, warmup: int = 1) -> dict:
    """Run fn `warmup` times, then once under torch.profiler; write trace.json and
    top_kernels.md into out."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with tprofile(activities=acts, record_shapes=True, profile_memory=True) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    md = [f"# {title}", "", f"- command: `python -m prada_fast.profile {' '.join(sys.argv[1:])}`",
          f"- device: {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
          f"- wall time of the profiled call (profiler overhead included): {wall:.3f} s", "",
          top_table(prof, device.type), ""]
    (out / "top_kernels.md").write_text("\n".join(md))
    return {"wall_s": wall, "trace": str(out / "trace.json"), "table": str(out / "top_kernels.md")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prada_fast.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    op = sub.add_parser("op", help="one forward + backward of prada_loss")
    op.add_argument("--impl", default="auto", choices=("auto", "triton", "chunked", "reference"))
    op.add_argument("--N", type=int, default=2048, help="rows (batch x sequence)")
    op.add_argument("--H", type=int, default=512)
    op.add_argument("--V", type=int, default=32000)
    op.add_argument("--Ht", type=int, default=512, help="teacher hidden size (0: no teacher)")
    op.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                    help="default: bfloat16 on CUDA, float32 on the CPU")
    op.add_argument("--compile", action="store_true", help="run the op under torch.compile")
    st = sub.add_parser("step", help="one ZeRO-3 training step (student + teacher)")
    st.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"))
    st.add_argument("--student", default="tiny")
    st.add_argument("--teacher", default="tiny-teacher", help="a preset, a directory or 'none'")
    st.add_argument("--vocab", type=int, default=32000, help="vocabulary of the presets (0: theirs)")
    st.add_argument("--batch", type=int, default=8)
    st.add_argument("--seq", type=int, default=256)
    st.add_argument("--ds", default=None, help="DeepSpeed config (default: ds_configs/zero3.json)")
    for s in (op, st):
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--warmup", type=int, default=1, help="unprofiled calls first")
        s.add_argument("--out", default="prof", help="output folder")
        s.add_argument("--bare", action="store_true",
                       help="no torch.profiler: just the warm-up and one call (under ncu / nsys, "
                            "which cannot share CUPTI with torch.profiler)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.what == "op":
        dev = torch.device(a.device)
        dtype = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        x = op_inputs(a.N, a.H, a.V, a.Ht, dtype=dtype, device=dev)
        def fn():
            return op_step(x, a.impl)
        if a.compile:
            fn = torch.compile(fn)
        title = f"prada_loss impl={a.impl}{' (compiled)' if a.compile else ''}: N={a.N} H={a.H} " \
                f"V={a.V} H_t={a.Ht} {dtype}, forward + backward"
    else:
        step, desc = build_train_step(student=a.student, teacher=a.teacher, vocab=a.vocab,
                                      batch=a.batch, seq=a.seq, loss_impl=a.loss_impl, ds_config=a.ds)
        dev = torch.device(desc["device"])
        fn = step
        title = (f"training step, loss impl={a.loss_impl}: student {a.student}, teacher {a.teacher}, "
                 f"V={desc['vocab']}, {a.batch} x {a.seq} tokens, ZeRO-{desc['zero_stage']}")
    if a.bare:
        for _ in range(a.warmup + 1):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        print(f"ran {a.warmup} + 1 call(s) of: {title}")
    else:
        res = profile(fn, out, dev, title, warmup=a.warmup)
        print(f"wrote {res['trace']} and {res['table']} ({res['wall_s']:.2f} s profiled)")
    if a.what == "step":
        from . import distributed as dist_util
        dist_util.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
