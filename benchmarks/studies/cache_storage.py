"""Storage of the teacher-output cache, measured: the cache's own layout (raw row arrays per
writer part, memory-mapped, plus index.npy) against safetensors shards holding the same rows.

    python -m benchmarks.studies.cache_storage [--size-mb 96 --batch 16 --rows 100 --warm-batches 30
        --cold-batches 5 --shard-mb 32 --out benchmarks/out/cache_storage]

Synthetic rows of realistic shape, one case per cache mode: hidden rows of H_t = 1024 and
4096 (bfloat16), and top-k rows (K = 32 int32 ids + float32 log-probabilities); examples of
`--rows` +- 50 % rows each, `--size-mb` of rows per case. The same rows are stored three ways:

    numpy       exactly what `prada_fast.precompute_teacher` writes, through the cache's own
                API (teacher_cache.PartWriter batch by batch, write_index, a manifest) and read
                by its reader (teacher_cache.TeacherOutputs: memmaps + entry());
    st-shard    safetensors shards (`--shard-mb` each, written whole: safetensors cannot
                append), one tensor per row array and shard, the same index.npy; read with
                safe_open(...).get_slice(name)[row:row + n];
    st-example  the same shards with one tensor per example and array, read with get_tensor.

Both safetensors readers are TeacherOutputs with another `entry`, so the trainer's path
(`op_inputs`) is the same code for all three. Measured per case and layout: write time
(rows already in memory; each layout fsyncs what it writes: per batch of `--batch`
examples, per shard) and bytes on disk (rows + index); then, in a fresh process each,
micro-batches of `--batch` random examples: `fetch` (each example's rows into one tensor per
array, the storage part) and `op_inputs` (the trainer's whole teacher-input step: example
keys, padded tensors), median ms with a warm page cache (the files read through once, not
mapped), opening the reader + `fetch` with a cold one (caches dropped, `sync; echo 3 >
/proc/sys/vm/drop_caches`, before each micro-batch: needs root; skipped otherwise), and the
reader process's peak RSS growth over the warm phase (opening the reader included; mapped
file pages count). Prints a markdown table and writes OUT/results.json; the cache folders
are deleted unless --keep. Uses the `safetensors` package (installed with transformers).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from prada_fast.common.files import write_json_atomic  # noqa: E402
from prada_fast import precompute_teacher
from prada_fast.teacher import cache as tc
from prada_fast.data import Collator
from prada_fast.data.format import IGNORE_INDEX

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError:  # pragma: no cover - a message, not a failure deep inside
    raise SystemExit("benchmarks.studies.cache_storage needs safetensors (a dependency of transformers): "
                     "pip install safetensors") from None

CASES = {  # name: (mode, H_t, K)
    "hidden1024": ("hidden", 1024, 0),
    "hidden4096": ("hidden", 4096, 0),
    "topk32": ("topk", 0, 32),
}
LABELS = {"hidden1024": "hidden H_t=1024 bf16", "hidden4096": "hidden H_t=4096 bf16",
          "topk32": "top-k K=32"}
LAYOUTS = ("numpy", "st-shard", "st-example")
VOCAB = 256  # the synthetic head (hidden mode) is tiny: it is no part of the comparison
DROP = Path("/proc/sys/vm/drop_caches")
COLLATE = Collator(pad_id=0)  # right-padded micro-batches, as the trainer's (no soft prompt)


# ----------------------------------------------------------------------------- data
def make_examples(mode: str, width: int, k: int, size_mb: float, rows: int, seed: int,
                  least: int) -> list[dict]:
    """Examples ({input_ids, labels, domain, key, values: {array name: torch tensor of rows}}) of about
    `size_mb` MB of rows in all, at least `least`; an example of n rows has n + 1 tokens,
    all but the first labelled."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    row_bytes = width * 2 if mode == "hidden" else k * 8
    out, total = [], 0
    while total < size_mb * 1e6 or len(out) < least:
        n = rng.randint(rows // 2, rows * 3 // 2)
        ids = [rng.randrange(VOCAB) for _ in range(n + 1)]
        labels = [IGNORE_INDEX] + ids[1:]
        if mode == "hidden":
            values = {"hidden.bin": torch.randn(n, width, generator=g).to(torch.bfloat16)}
        else:
            lp = -torch.rand(n, k, generator=g).mul(10).sort(dim=1).values
            values = {"ids.bin": torch.randint(0, VOCAB, (n, k), generator=g, dtype=torch.int32),
                      "logprobs.bin": lp}
        out.append({"input_ids": ids, "labels": labels, "domain": 0, "key": tc.example_key(ids, labels),
                    "values": values})
        total += n * row_bytes
    return out


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The cache's on-disk numpy form, as precompute_teacher writes it."""
    return precompute_teacher.as_numpy(t, "bfloat16" if t.dtype == torch.bfloat16 else "float32")


def manifest(mode: str, width: int, k: int, parts: list[str], part_rows: list[int]) -> dict:
    return {"format": tc.FORMAT, "mode": mode, "k": k or None, "dtype": "bfloat16",
            "hidden_size": width, "vocab_size": VOCAB, "parts": parts, "part_rows": part_rows,
            "complete": True}


def finish(out: Path, mode: str, width: int, k: int, examples: list[dict], done: dict) -> None:
    """index.npy, head.npy (hidden mode), then the manifest: as precompute_teacher ends."""
    keys = [ex["key"] for ex in examples]
    parts = tc.write_index(out, keys, done)
    part_rows = [sum(n for p, _, n in done.values() if p == name) for name in parts]
    if mode == "hidden":
        np.save(out / tc.HEAD, as_numpy(torch.randn(VOCAB, width).to(torch.bfloat16)))
    write_json_atomic(out / tc.MANIFEST, manifest(mode, width, k, parts, part_rows))


# ----------------------------------------------------------------------------- writers
def write_numpy(out: Path, case: tuple, examples: list[dict], batch: int) -> None:
    """The cache's own writer: one part, a batch of examples at a time (fsync, commit)."""
    mode, width, k = case
    writer = tc.PartWriter(out / tc.PARTS / "w1-r0", tc.row_arrays(mode, width, k, "bfloat16"))
    try:
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            writer.write_rows({name: np.concatenate([as_numpy(ex["values"][name]) for ex in chunk])
                               for name in chunk[0]["values"]})
            writer.commit([ex["key"] for ex in chunk], [len(ex["input_ids"]) - 1 for ex in chunk])
    finally:
        writer.close()
    finish(out, mode, width, k, examples, tc.committed(out / tc.PARTS))


def write_safetensors(out: Path, case: tuple, examples: list[dict], shard_mb: float,
                      per_example: bool) -> None:
    """Shards of about `shard_mb` MB, each written whole (save_file, then fsync): one tensor
    per array name ("hidden.bin", ...) of all the shard's rows, or one per example
    ("KEY/hidden.bin")."""
    mode, width, k = case
    out.mkdir(parents=True)
    done, shard, size = {}, [], 0

    def flush():
        name = f"s{len(set(p for p, _, _ in done.values())):05d}"
        row = 0
        for ex in shard:
            n = len(ex["input_ids"]) - 1
            done[ex["key"]] = (name, row, n)
            row += n
        if per_example:
            tensors = {f"{ex['key']}/{a}": t for ex in shard for a, t in ex["values"].items()}
        else:
            tensors = {a: torch.cat([ex["values"][a] for ex in shard]) for a in shard[0]["values"]}
        path = out / f"{name}.safetensors"
        save_file(tensors, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())

    for ex in examples:
        shard.append(ex)
        size += sum(t.numel() * t.element_size() for t in ex["values"].values())
        if size >= shard_mb * 1e6:
            flush()
            shard, size = [], 0
    if shard:
        flush()
    finish(out, mode, width, k, examples, done)


class SafetensorsOutputs(tc.TeacherOutputs):
    """TeacherOutputs over safetensors shards: the same index and op_inputs, another entry."""

    def __init__(self, path: Path, per_example: bool):
        self.path, self.per_example = Path(path), per_example
        self.manifest = tc.open_manifest(self.path)
        self.mode, self.dtype = self.manifest["mode"], torch.float32
        index = np.load(self.path / tc.INDEX, mmap_mode="r")
        self.rows = {bytes(e["key"]).decode(): (int(e["part"]), int(e["row"]), int(e["n"]))
                     for e in index}
        self.parts = [safe_open(str(self.path / f"{name}.safetensors"), framework="pt")
                      for name in self.manifest["parts"]]
        self.head = None
        if self.mode == "hidden":
            self.head = super()._tensor(np.load(self.path / tc.HEAD)).to(self.dtype)

    def entry(self, key: str, name: str) -> torch.Tensor:
        part, row, n = self.rows[key]
        f = self.parts[part]
        return f.get_tensor(f"{key}/{name}") if self.per_example else f.get_slice(name)[row:row + n]

    def _tensor(self, a) -> torch.Tensor:
        return a if isinstance(a, torch.Tensor) else super()._tensor(a)


def open_reader(layout: str, path: Path) -> tc.TeacherOutputs:
    return tc.TeacherOutputs(path) if layout == "numpy" else SafetensorsOutputs(path, layout == "st-example")


# ----------------------------------------------------------------------------- reading
def fetch(reader: tc.TeacherOutputs, keys: list[str], names: list[str]) -> dict:
    """The storage part of op_inputs: each example's rows, one tensor per array."""
    return {n: torch.cat([reader._tensor(reader.entry(key, n)) for key in keys]) for n in names}


def memory() -> dict:
    """This process's resident memory (MiB): now, peak, file-backed (mapped pages)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssFile")}


def drop_caches() -> bool:
    os.sync()
    try:
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def read_job(layout: str, path: str, batches: list[list[dict]], warm: int, cold: int) -> dict:
    """In a fresh process: warm micro-batches (3 untimed first), then cold ones."""
    torch.set_num_threads(1)
    path = Path(path)
    names = list(batches[0][0]["values"])
    before = memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:
        pass
    reader = open_reader(layout, path)
    times_fetch, times_op = [], []
    for i, mb in enumerate(batches[:warm + 3]):
        keys = [ex["key"] for ex in mb]
        t0 = time.perf_counter()
        fetch(reader, keys, names)
        t1 = time.perf_counter()
        reader.op_inputs(COLLATE(mb), "cpu")
        t2 = time.perf_counter()
        if i >= 3:
            times_fetch.append(t1 - t0)
            times_op.append(t2 - t1)
    after = memory()
    del reader
    res = {"warm_fetch_ms": 1e3 * statistics.median(times_fetch),
           "warm_op_inputs_ms": 1e3 * statistics.median(times_op),
           "peak_rss_growth_mib": after["VmHWM"] - before["VmRSS"],
           "rss_file_growth_mib": after["RssFile"] - before["RssFile"]}
    cold_fetch, cold_open = [], []
    for mb in batches[warm + 3:warm + 3 + cold]:
        if not drop_caches():
            res["cold"] = f"not permitted: {DROP} is not writable"
            break
        t0 = time.perf_counter()
        reader = open_reader(layout, path)
        t1 = time.perf_counter()
        fetch(reader, [ex["key"] for ex in mb], names)
        t2 = time.perf_counter()
        del reader
        cold_open.append(t1 - t0)
        cold_fetch.append(t2 - t1)
    if cold_fetch:
        res["cold_fetch_ms"] = 1e3 * statistics.median(cold_fetch)
        res["cold_open_ms"] = 1e3 * statistics.median(cold_open)
    return res


def read_through(path: Path) -> None:
    """Warm the page cache with every file of a cache, without mapping it here."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk for the rows and the index (not the synthetic head)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*")
               if f.is_file() and f.name not in (tc.HEAD, tc.MANIFEST, tc.PROGRESS))


# ----------------------------------------------------------------------------- main
def run_case(name: str, case: tuple, args, spawn) -> list[dict]:
    mode, width, k = case
    examples = make_examples(mode, width, k, args.size_mb, args.rows, args.seed, args.batch)
    payload = sum(t.numel() * t.element_size() for ex in examples for t in ex["values"].values())
    rng = random.Random(args.seed + 1)
    n_batches = args.warm_batches + 3 + args.cold_batches
    light = [{**ex, "values": dict.fromkeys(ex["values"])} for ex in examples]  # to the reader
    batches = [rng.sample(light, args.batch) for _ in range(n_batches)]
    rows = []
    for layout in args.layouts:
        path = args.out / f"{mode}{width or k}-{layout}"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        if layout == "numpy":
            write_numpy(path, case, examples, args.batch)
        else:
            write_safetensors(path, case, examples, args.shard_mb, layout == "st-example")
        write_s = time.perf_counter() - t0
        read_through(path)
        with cf.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            res = pool.submit(read_job, layout, str(path), batches, args.warm_batches,
                              args.cold_batches).result()
        row = {"case": LABELS[name], "layout": layout, "examples": len(examples),
               "rows": sum(len(ex["input_ids"]) - 1 for ex in examples), "payload_mb": payload / 1e6,
               "write_s": write_s, "disk_mb": disk_bytes(path) / 1e6, **res}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(path)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| case | layout | write s | on disk MB (rows + index) | warm fetch ms | warm op_inputs ms "
            "| cold open + fetch ms (fetch) | peak RSS growth MiB (mapped file) |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        cold = (f"{r['cold_open_ms'] + r['cold_fetch_ms']:.1f} ({r['cold_fetch_ms']:.1f})"
                if "cold_fetch_ms" in r
                else r.get("cold", "-"))
        lines.append(f"| {r['case']} | {r['layout']} | {r['write_s']:.2f} | {r['disk_mb']:.1f} "
                     f"(payload {r['payload_mb']:.1f}) | {r['warm_fetch_ms']:.2f} | "
                     f"{r['warm_op_inputs_ms']:.2f} | {cold} | {r['peak_rss_growth_mib']:.0f} "
                     f"({r['rss_file_growth_mib']:.0f}) |")
    return head + "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-mb", type=float, default=96,
                   help="MB of rows per case (each layout stores a copy of them)")
    p.add_argument("--rows", type=int, default=100,
                   help="mean rows (labelled positions) per example; each has rows/2 to 3*rows/2")
    p.add_argument("--batch", type=int, default=16,
                   help="examples per micro-batch read, and per batch written by the numpy layout")
    p.add_argument("--warm-batches", type=int, default=30,
                   help="timed micro-batches with a warm page cache (after 3 untimed)")
    p.add_argument("--cold-batches", type=int, default=5,
                   help="timed micro-batches each after dropping the page cache (0: none)")
    p.add_argument("--shard-mb", type=float, default=32, help="MB of rows per safetensors shard")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                   help="which row shapes to measure: " + ", ".join(f"{k} ({v})" for k, v in LABELS.items()))
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                   help="which layouts to measure")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows and of the batches")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/cache_storage"),
                   help="folder of the caches (deleted after each) and of results.json")
    p.add_argument("--keep", action="store_true", help="keep the cache folders")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")
    rows = []
    t0 = time.perf_counter()
    for name in args.cases:
        rows += run_case(name, CASES[name], args, spawn)
    text = table(rows)
    print("\n" + text)
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
         "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    print(f"\n{time.perf_counter() - t0:.0f} s; written {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
