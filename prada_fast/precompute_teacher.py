"""Cache the teacher's outputs on the training examples, for `train.py --teacher-outputs DIR`.

    python -m prada_fast.precompute_teacher --out DIR [the trainer's data and teacher flags]
    deepspeed --module prada_fast.precompute_teacher --out DIR ...   (or torchrun -m ...)

The data, tokenizer and teacher are the trainer's (the same flags give the same training
examples and the same teacher: an auto teacher is fitted, or reused from the fit cache,
exactly as the trainer would). Across ranks the teacher runs under ZeRO-3 inference with
the DeepSpeed config of --ds (in a world of one it is a plain frozen module, as in the
trainer: trainer/engines.py `teacher_engine`); the ranks share the examples, each writes its own part, and
rank 0 writes the index and, last and atomically, the manifest (teacher_cache.py describes
the layout). A crash leaves no manifest; rerunning with the same flags resumes from the
batches already on disk.

The teacher never sees the student's soft prompt, so the cache does not depend on
--prompt-len: the trainer puts the prompt's rows in front."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

if not __package__:  # run as a script: this checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prada_fast.common import distributed as dist_util  # noqa: E402
from prada_fast.common.files import write_atomic, write_json_atomic  # noqa: E402
from prada_fast.teacher import cache as tc  # noqa: E402
from prada_fast.teacher.live import teacher_hidden  # noqa: E402
from prada_fast.common.exits import ExitCode  # noqa: E402
from prada_fast.common.flags import FlagError, FlagParser, at_least, check_data_flags  # noqa: E402
from prada_fast.common.flags import add_data_flags, add_model_flags, add_run_flags, check_model_dirs  # noqa: E402
from prada_fast.trainer.flags import default_data  # noqa: E402
from prada_fast.data import DataError  # noqa: E402
from prada_fast.trainer.dsconfig import ConfigError, check_with_deepspeed, load_ds_config  # noqa: E402
from prada_fast.models import PRESETS, ModelError, byte_tokenizer  # noqa: E402
from prada_fast.models.hub import resolve_args  # noqa: E402

ROW_CHUNK = 1024  # rows per top-k product (ROW_CHUNK x V logits at a time)
RANGES = {"k": at_least(1), "batch_size": at_least(1), "crash_after": at_least(0)}


def build_precompute_parser() -> FlagParser:
    p = FlagParser(
        prog="python -m prada_fast.precompute_teacher",
        description="Cache the teacher's outputs on the training examples for `prada_fast/train.py "
                    "--teacher-outputs DIR`: its final hidden states at every labelled position plus "
                    "its LM head (--mode hidden: the trainer's KD is then exactly the live teacher's), "
                    "or per labelled position the top-K ids and log-probabilities at --temperature "
                    "(--mode topk). Give it the flags of the training run (data, student, teacher, "
                    "--max-len, --seed); run it under deepspeed, torchrun or plain python.",
        ranges=RANGES)
    own = p.add_argument_group("cache")
    own.add_argument("--out", required=True, metavar="DIR",
                     help="the cache folder (resumed when it holds an unfinished cache of the same inputs)")
    own.add_argument("--mode", choices=tc.MODES, default="hidden",
                     help="hidden: teacher final hidden states + LM head (exact KD); topk: top-K "
                          "ids and log-probabilities at --temperature (compact, approximate)")
    own.add_argument("--k", type=int, default=32, metavar="K", help="ids per position (--mode topk)")
    own.add_argument("--dtype", choices=("auto", *tc.DTYPES), default="auto",
                     help="hidden states' storage dtype; auto: the teacher's compute dtype (bfloat16 "
                          "when the DeepSpeed config enables bf16, else float32)")
    for name, default, metavar, text in (
            ("--batch-size", 16, "B", "examples per teacher forward pass and per committed batch"),
            ("--crash-after", 0, "N", "fault injection for tests: exit abruptly after committing N "
                                      "batches, with the next batch's rows half written (0: never)")):
        own.add_argument(name, type=int, default=default, metavar=metavar, help=text)
    # the trainer's flags that decide the examples, the tokenizer, the teacher and how it runs
    shared = p.add_argument_group("the trainer's flags (see prada_fast/train.py --help)")
    add_run_flags(p, shared)
    add_data_flags(p, shared)
    add_model_flags(p, shared)
    return p


def parse_args(argv=None):
    parser = build_precompute_parser()
    return parser.parse_flags(argv, lambda args: validate(parser, args), prepare=default_data)


def validate(parser, args) -> None:
    """Paths and combinations of the flags (their ranges are checked before), before any
    work (FlagError names the flag)."""
    check_data_flags(parser, args)
    if args.teacher == "none" or (args.teacher == "auto" and args.student not in PRESETS):
        raise FlagError(f"--teacher {args.teacher}: there is no teacher to cache"
                        + (" (auto fits one for a preset student only)" if args.teacher == "auto" else ""))
    check_model_dirs(parser, args, teacher_names=("auto",))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FlagError(f"--out {out}: a file, not a directory")


def log(msg: str) -> None:
    if dist_util.rank() == 0:
        print(f"[precompute] {msg}", flush=True)


def load_tokenizer(student: str):
    """The student's tokenizer (what the trainer encodes the data with), without its weights."""
    if student in PRESETS:
        return byte_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(student)


# ----------------------------------------------------------------------------- the work
def run(args) -> int:
    from prada_fast.data.prepare import load_run_data
    from prada_fast.teacher.resolve import resolve_teacher
    from prada_fast.trainer.settings import data_settings, teacher_spec
    from prada_fast.trainer.engines import teacher_engine  # the trainer's frozen teacher
    info = dist_util.setup(args.dist_timeout)
    resolve_args(args, log=log)  # real presets -> their directories, as the trainer does
    ds_cfg = load_ds_config(args.ds, world_size=info.world_size, device=info.device, max_steps=1)
    check_with_deepspeed(ds_cfg, args.ds)
    torch.manual_seed(args.seed)
    data = load_run_data(data_settings(args))
    log(f"data: {data.describe()}")
    tok = load_tokenizer(args.student)
    from prada_fast.data import Collator
    from prada_fast.data.prepare import encode_all
    domain_ids = {d: i for i, d in enumerate(data.domains)}
    examples, _ = encode_all(data.train_records, tok, args.max_len, domain_ids)
    collate = Collator(tok.pad_token_id)
    bf16 = bool(ds_cfg.get("bf16", {}).get("enabled"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if bf16 else "float32")
    keys = tc.cached_keys(examples)
    spec = tc.inputs_spec(mode=args.mode, tok=tok, max_len=args.max_len, temperature=args.temperature,
                          k=args.k, dtype=dtype, teacher=tc.teacher_provenance(teacher_spec(args), examples),
                          data=data_settings(args), keys=keys)
    out = Path(args.out)
    if (out / tc.MANIFEST).is_file():
        found = tc.read_json(out / tc.MANIFEST)
        if tc.first_difference(spec, found) is None:
            log(f"{out}: a finished cache of these inputs already; nothing to do")
            return ExitCode.OK
    for name in (tc.MANIFEST, tc.SPEC):  # refuse to mix other inputs into a cache
        if (out / name).is_file():
            found = tc.read_json(out / name)
            field = tc.first_difference(spec, found)
            if field:
                raise tc.TeacherCacheError(
                    f"--out {out}: holds a cache of other inputs (field \"{field}\": "
                    f"{tc.describe(found.get(field))}, this run {tc.describe(spec.get(field))}); "
                    "choose another --out or delete it")
    dist_util.barrier()
    if info.rank == 0:
        (out / tc.PARTS).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / tc.SPEC, spec)
    teacher = resolve_teacher(teacher_spec(args), args.student, tok, examples, collate, attn=args.attn,
                              show_progress=not args.no_progress, log=log)
    if teacher is None:
        raise ModelError("no teacher to cache")
    teacher_eng = teacher_engine(teacher, ds_cfg)
    head = gathered_head(teacher_eng)
    todo = remaining(out, examples, keys)
    log(f"{len(keys)} labelled examples, {len(keys) - len(todo)} cached already, {len(todo)} to go; "
        f"mode {args.mode}" + (f", K={args.k}, tau={args.temperature}" if args.mode == "topk" else
                               f", {dtype}") + f"; {info.world_size} rank(s)")
    t0 = time.time()
    compute(args, teacher_eng, head, todo, collate, out, dtype, info)
    dist_util.barrier()
    if info.rank == 0:
        finish(out, spec, keys, head, dtype, info, seconds=time.time() - t0)
    dist_util.barrier()
    return ExitCode.OK


def gathered_head(teacher_eng) -> torch.Tensor:
    """A full copy of the teacher's LM head weight (V x H_t), gathered from its partitions."""
    from deepspeed import zero
    w = teacher_eng.module.get_output_embeddings().weight
    with zero.GatheredParameters([w], modifier_rank=None):
        return w.detach().clone()


def remaining(out: Path, examples: list[dict], keys: list[str]) -> list[dict]:
    """The labelled examples without committed rows, one per key, longest first (batches
    of similar lengths)."""
    done, wanted = tc.committed(out / tc.PARTS), set(keys)
    by_key = {}
    for ex in examples:
        k = tc.example_key(ex["input_ids"], ex["labels"])
        if k in wanted and k not in done:
            by_key.setdefault(k, ex)
    return sorted(by_key.values(), key=lambda ex: (-len(ex["input_ids"]), tc.example_key(
        ex["input_ids"], ex["labels"])))


def teacher_rows(args, teacher_eng, head: torch.Tensor, mb: dict, batch: list[dict], device) -> tuple:
    """(keys, rows per example, {file: rows}) of one batch."""
    hidden, _ = teacher_hidden(teacher_eng, mb, device)  # the trainer's teacher forward pass
    keys, counts, rows = [], [], []
    for b, ex in enumerate(batch):
        pos = tc.labelled_positions(ex["labels"])
        keys.append(tc.example_key(ex["input_ids"], ex["labels"]))
        counts.append(len(pos))
        rows.append(hidden[b, pos])
    u = torch.cat(rows).cpu()
    if args.mode == "hidden":
        return keys, counts, {"hidden.bin": u}
    ids, lps = [], []
    w = head.to(device)
    for i in range(0, u.shape[0], ROW_CHUNK):
        z = (u[i:i + ROW_CHUNK].to(device).float() @ w.float().T) / args.temperature
        top = torch.log_softmax(z, -1).topk(min(args.k, z.shape[-1]), dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        lps.append(top.values.cpu())
    return keys, counts, {"ids.bin": torch.cat(ids), "logprobs.bin": torch.cat(lps)}


def as_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16" and t.is_floating_point():
        return t.to(torch.bfloat16).view(torch.uint16).numpy()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def compute(args, teacher_eng, head, todo: list[dict], collate, out: Path, dtype: str, info) -> None:
    """This rank's share of `todo`, in batches, appended to its part. Every rank runs the
    same number of forward passes (ZeRO-3 gathers each layer collectively): a rank with
    fewer batches repeats a pass whose rows it drops."""
    mine = todo[info.rank::info.world_size]
    bs = args.batch_size
    n_batches = math.ceil(math.ceil(len(todo) / info.world_size) / bs) if todo else 0
    arrays = tc.row_arrays(args.mode, head.shape[1], args.k, dtype)
    writer = tc.PartWriter(out / tc.PARTS / f"w{info.world_size}-r{info.rank}", arrays)
    device = teacher_eng.device
    bar = tqdm(total=len(mine), desc="teacher outputs" + (" (rank 0's share)" if info.world_size > 1
                                                          else ""),
               unit="ex", dynamic_ncols=True, disable=info.rank != 0 or args.no_progress)
    try:
        for i in range(n_batches):
            batch = mine[i * bs:(i + 1) * bs]
            real = bool(batch)
            batch = batch or todo[:1]  # the dummy pass of a rank with no batch left
            keys, counts, rows = teacher_rows(args, teacher_eng, head, collate(batch), batch, device)
            if not real:
                continue
            values = {name: as_numpy(t, dtype) for name, t in rows.items()}
            if args.crash_after and i == args.crash_after:
                writer.write_rows({n: v[: max(1, len(v) // 2)] for n, v in values.items()})
                os._exit(1)  # a crash: no clean-up, half a batch's rows on disk, uncommitted
            writer.write_rows(values)
            writer.commit(keys, counts)
            bar.update(len(batch))
    finally:
        writer.close()
        bar.close()


def finish(out: Path, spec: dict, keys: list[str], head: torch.Tensor, dtype: str, info,
           seconds: float) -> None:
    """Rank 0: the head, the index over every part, then the manifest (last, atomically).
    Rows a crash left uncommitted in a part no rank reopened are cut off first."""
    arrays = tc.row_arrays(spec["mode"], head.shape[1], spec["k"] or 0, dtype)
    for part in sorted(p for p in (out / tc.PARTS).iterdir() if p.is_dir()):
        tc.PartWriter(part, arrays).close()
    done = tc.committed(out / tc.PARTS)
    missing = [k for k in keys if k not in done]
    if missing:
        raise tc.TeacherCacheError(f"--out {out}: {len(missing)} examples have no rows after the "
                                   "pass (a rank failed?); rerun to resume")
    parts = tc.write_index(out, keys, done)
    part_rows = [sum(sum(b["rows"]) for b in tc.read_progress(out / tc.PARTS / p)) for p in parts]
    if spec["mode"] == "hidden":
        write_atomic(out / tc.HEAD, lambda tmp: np.save(tmp, as_numpy(head.cpu(), dtype)))
    rows = sum(done[k][2] for k in keys)
    manifest = {**spec, "complete": True, "hidden_size": int(head.shape[1]),
                "vocab_size": int(head.shape[0]), "parts": parts, "part_rows": part_rows,
                "rows": rows, "positions": "t with labels[t + 1] != -100; no soft prompt",
                "world_size": info.world_size, "seconds": round(seconds, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(out / tc.MANIFEST, manifest)
    size = sum(f.stat().st_size for f in (out / tc.PARTS).rglob("*.bin"))
    log(f"cache written to {out}: {len(keys)} examples, {rows} positions, "
        f"{size / max(rows, 1):.0f} bytes per position, {seconds:.1f}s")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    try:
        return run(args)
    except (DataError, ModelError, ConfigError, tc.TeacherCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except dist_util.RankFailure as e:
        print(f"error: rank {dist_util.rank()}: {e}", file=sys.stderr)
        return ExitCode.RANK_FAILED
    finally:
        dist_util.teardown()


if __name__ == "__main__":
    sys.exit(main())
