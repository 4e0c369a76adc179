"""A cache of the teacher's outputs on the training examples, written by
`python -m prada_fast.precompute_teacher` and read by the trainer (`--teacher-outputs DIR`)
instead of running a teacher.

Rows: one per labelled position of an example, in order: position t of the token sequence
(the teacher sees no soft prompt) where labels[t + 1] != -100, i.e. where the student is
trained to predict token t + 1. An example without a labelled position has no entry.

    mode "hidden": the teacher's final hidden state (H_t values, float32 or bfloat16), plus
                   the teacher's LM head weight (V x H_t) in head.npy: with them the op
                   computes exactly the KD of the live teacher;
    mode "topk":   the K ids (int32) of the largest teacher log-probabilities at the
                   temperature tau, and those log-probabilities (float32,
                   log_softmax(logits / tau), over the full vocabulary).

Layout of DIR:

    manifest.json   what the cache was made from (MANIFEST_FIELDS); written last and
                    atomically: a folder without it is an unfinished cache, never read
    index.npy       per example: key (a hash of its token ids and labels), part, first row,
                    row count; structured numpy array, memory-mapped
    head.npy        (hidden mode) the teacher's LM head weight
    spec.json       the manifest's fields known before the work, to resume only the same work
    parts/NAME/     one writer's rows: hidden.bin, or ids.bin + logprobs.bin (raw arrays,
                    memory-mapped), and progress.jsonl: one line per batch whose rows are
                    on disk (written after them), so a crash loses at most one batch
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from prada_fast.common.files import write_atomic
from prada_fast.data.prepare import DataSettings
from prada_fast.teacher.resolve import TeacherSpec, teacher_provenance

FORMAT = 1
MANIFEST = "manifest.json"
SPEC = "spec.json"
INDEX = "index.npy"
HEAD = "head.npy"
PARTS = "parts"
PROGRESS = "progress.jsonl"
MODES = ("hidden", "topk")
DTYPES = {"float32": (np.float32, torch.float32), "bfloat16": (np.uint16, torch.bfloat16)}
INDEX_DTYPE = np.dtype([("key", "S32"), ("part", "<i4"), ("row", "<i8"), ("n", "<i8")])
# the fields a run is checked against, in the order of the checks (check_matches)
MANIFEST_FIELDS = ("format", "mode", "tokenizer", "max_len", "temperature", "k", "dtype",
                   "teacher", "data", "records")


class TeacherCacheError(ValueError):
    """A cache that cannot serve this run (unfinished, or made from other inputs); the
    message names the cache and the field."""


# ----------------------------------------------------------------------------- identities
def example_key(input_ids, labels) -> str:
    """The key of an encoded example: a hash of its token ids and labels (lists of ints)."""
    text = json.dumps([list(map(int, input_ids)), list(map(int, labels))], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def labelled_positions(labels) -> list[int]:
    """Positions t whose next token t + 1 is labelled (the rows of an example)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != -100]


def tokenizer_identity(tok) -> dict:
    """The tokenizer's class and a hash of its vocabulary and special tokens."""
    vocab = sorted(tok.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    h = hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]
    return {"class": type(tok).__name__, "size": len(tok), "sha256": h}


def directory_hash(path: Path) -> str:
    """A hash of every file under a model directory (relative name, then contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def records_identity(keys) -> dict:
    """Count and hash of a set of example keys."""
    keys = sorted(set(keys))
    return {"count": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]}


# ----------------------------------------------------------------------------- manifest
def read_json(path: Path):
    return json.loads(Path(path).read_text())


def first_difference(expected: dict, found: dict, fields=MANIFEST_FIELDS) -> str | None:
    """The first field of `fields` whose values differ, or None."""
    for name in fields:
        if expected.get(name) != found.get(name):
            return name
    return None


def describe(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def check_matches(path: Path, manifest: dict, run: dict, fields) -> None:
    """Refuse (TeacherCacheError, one line naming the field) a cache whose manifest differs
    from `run` (the same fields, computed from this run's flags) in one of `fields`."""
    name = first_difference(run, manifest, fields)
    if name is not None:
        raise TeacherCacheError(
            f"--teacher-outputs {path}: field \"{name}\": the cache has {describe(manifest.get(name))}, "
            f"this run {describe(run.get(name))}")


# ----------------------------------------------------------------------------- writing
def row_arrays(mode: str, width: int, k: int, dtype: str) -> dict:
    """{file name: (numpy dtype, values per row)} of a part."""
    if mode == "hidden":
        return {"hidden.bin": (np.dtype(DTYPES[dtype][0]), width)}
    return {"ids.bin": (np.dtype(np.int32), k), "logprobs.bin": (np.dtype(np.float32), k)}


def read_progress(part: Path) -> list[dict]:
    """The committed batches of a part ({"keys": [...], "rows": [...]} each); a last line cut
    by a crash is not committed."""
    f = part / PROGRESS
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def committed(parts_dir: Path) -> dict[str, tuple[str, int, int]]:
    """{key: (part name, first row, rows)} of every committed entry under parts/."""
    done = {}
    if not parts_dir.is_dir():
        return done
    for part in sorted(p for p in parts_dir.iterdir() if p.is_dir()):
        row = 0
        for batch in read_progress(part):
            for key, n in zip(batch["keys"], batch["rows"]):
                done.setdefault(key, (part.name, row, n))
                row += n
    return done


class PartWriter:
    """Appends one writer's rows to parts/NAME; on opening, drops rows a crash left beyond
    the last committed batch."""

    def __init__(self, part: Path, arrays: dict):
        self.part, self.arrays = part, arrays
        part.mkdir(parents=True, exist_ok=True)
        good = read_progress(part)
        self.rows = sum(sum(b["rows"]) for b in good)
        self.files = {}
        for name, (dt, width) in arrays.items():
            f = open(part / name, "ab")  # noqa: SIM115 (closed by close())
            f.truncate(self.rows * width * dt.itemsize)
            f.seek(0, os.SEEK_END)
            self.files[name] = f
        with open(part / PROGRESS, "w") as f:  # without a cut last line
            f.writelines(json.dumps(b) + "\n" for b in good)
        self.progress = open(part / PROGRESS, "a")  # noqa: SIM115

    def write_rows(self, values: dict) -> None:
        """The rows of one batch ({file name: array of rows}), on disk (not yet committed)."""
        for name, a in values.items():
            dt, width = self.arrays[name]
            a = np.ascontiguousarray(a, dtype=dt)
            assert a.ndim == 2 and a.shape[1] == width, (name, a.shape, width)
            self.files[name].write(a.tobytes())
            self.files[name].flush()
            os.fsync(self.files[name].fileno())

    def commit(self, keys: list[str], rows: list[int]) -> None:
        """Mark the batch written by write_rows as done."""
        self.progress.write(json.dumps({"keys": keys, "rows": rows}) + "\n")
        self.progress.flush()
        os.fsync(self.progress.fileno())
        self.rows += sum(rows)

    def close(self) -> None:
        for f in [*self.files.values(), self.progress]:
            f.close()


def write_index(out: Path, keys: list[str], done: dict) -> list[str]:
    """index.npy for `keys` (every one committed) from the parts; returns the part names
    it refers to (its "part" field numbers them in this order)."""
    parts = sorted({done[k][0] for k in keys})
    pid = {p: i for i, p in enumerate(parts)}
    index = np.zeros(len(keys), dtype=INDEX_DTYPE)
    for i, k in enumerate(keys):
        part, row, n = done[k]
        index[i] = (k.encode(), pid[part], row, n)
    write_atomic(out / INDEX, lambda tmp: np.save(tmp, index))
    return parts


# ----------------------------------------------------------------------------- reading
def open_manifest(path: Path) -> dict:
    """The manifest of a finished cache, or TeacherCacheError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherCacheError(f"--teacher-outputs {path}: no such directory")
    if not (path / MANIFEST).is_file():
        raise TeacherCacheError(
            f"--teacher-outputs {path}: not a finished teacher cache (no {MANIFEST}; an interrupted "
            "`python -m prada_fast.precompute_teacher` resumes when rerun with the same flags)")
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherCacheError(f"--teacher-outputs {path}: unreadable {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"--teacher-outputs {path}: field \"format\": the cache has "
                                f"{manifest.get('format')}, this version reads {FORMAT}")
    return manifest


def example_spans(mb: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of each example in a collated batch: a row's real tokens, or with
    `seq_index` (packed rows) each run of positions with the same sequence number >= 0,
    less its soft-prompt slots in front (attention_mask 0: packing.PackedCollator)."""
    if "seq_index" not in mb:
        return [(b, 0, int(n)) for b, n in enumerate(mb["attention_mask"].sum(1).tolist())]
    out = []
    for b, (row, real) in enumerate(zip(mb["seq_index"].tolist(), mb["attention_mask"].tolist())):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                if row[start] >= 0:
                    first = next((i for i in range(start, t) if real[i]), t)
                    out.append((b, first, t))
                start = t
    return out


def labelled_spans(mb: dict) -> list[tuple[int, torch.Tensor, str]]:
    """(row, positions in the row, key) of each example of the collated batch `mb` that has
    labelled positions (`example_spans`, `labelled_positions`, `example_key`): where a
    teacher's rows for that example go."""
    ids, labels = mb["input_ids"], mb["labels"]
    out = []
    for b, start, end in example_spans(mb):
        lab = labels[b, start:end].tolist()
        pos = labelled_positions(lab)
        if pos:
            out.append((b, torch.tensor(pos) + start, example_key(ids[b, start:end].tolist(), lab)))
    return out


class TeacherOutputs:
    """The teacher of a training run, read from a finished cache: `op_inputs(mb, device)`
    gives a micro-batch's teacher arguments of the loss op (teacher_hidden and
    teacher_weight, or teacher_topk_ids and teacher_topk_logprobs), each example's rows
    read from the memory-mapped parts by its key. A TeacherSource (teacher/interface.py)."""

    partitioned = ()  # plain tensors: nothing for ZeRO-3 to gather

    def __init__(self, path: Path, manifest: dict | None = None, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.manifest = manifest or open_manifest(self.path)
        m = self.manifest
        self.mode, self.dtype = m["mode"], dtype
        index = np.load(self.path / INDEX, mmap_mode="r")
        self.rows = {bytes(e["key"]).decode(): (int(e["part"]), int(e["row"]), int(e["n"]))
                     for e in index}
        arrays = row_arrays(m["mode"], m["hidden_size"], m.get("k") or 0, m.get("dtype") or "float32")
        self.parts = []
        for name, total in zip(m["parts"], m["part_rows"]):
            files = {}
            for fname, (dt, width) in arrays.items():
                files[fname] = np.memmap(self.path / PARTS / name / fname, dtype=dt, mode="r",
                                         shape=(total, width)) if total else np.zeros((0, width), dt)
            self.parts.append(files)
        self.head = None
        if self.mode == "hidden":
            self.head = self._tensor(np.load(self.path / HEAD)).to(dtype)

    def set_dtype(self, dtype: torch.dtype) -> None:
        """The dtype of the tensors `op_inputs` gives in hidden mode (the student's)."""
        self.dtype = dtype
        if self.head is not None:
            self.head = self.head.to(dtype)

    def entry(self, key: str, name: str) -> np.ndarray:
        part, row, n = self.rows[key]
        return self.parts[part][name][row:row + n]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))
        return t.view(torch.bfloat16) if a.dtype == np.uint16 else t

    def op_inputs(self, mb: dict, device) -> dict:
        """The teacher arguments of the loss op for the collated micro-batch `mb` (rows
        right-padded: attention_mask gives each row's length; packed rows: `seq_index`
        gives each position's sequence, -1 none, and each sequence is an example)."""
        B, T = mb["input_ids"].shape
        if self.mode == "hidden":
            out = torch.zeros(B, T, self.manifest["hidden_size"], dtype=self.dtype)
        else:
            k, vocab = self.manifest["k"], self.manifest["vocab_size"]
            top_ids = torch.arange(k, dtype=torch.long).expand(B, T, k).clone()
            top_lp = torch.full((B, T, k), -math.log(vocab), dtype=torch.float32)  # unused rows
        for b, pos, key in labelled_spans(mb):
            if key not in self.rows:
                raise TeacherCacheError(f"--teacher-outputs {self.path}: field \"records\": an "
                                        f"example of this batch (row {b}) is not in the cache")
            if self.mode == "hidden":
                out[b, pos] = self._tensor(self.entry(key, "hidden.bin")).to(self.dtype)
            else:
                top_ids[b, pos] = self._tensor(self.entry(key, "ids.bin")).long()
                top_lp[b, pos] = self._tensor(self.entry(key, "logprobs.bin"))
        if self.mode == "hidden":
            if self.head.device != torch.device(device):  # moved once, kept there
                self.head = self.head.to(device)
            return {"teacher_hidden": out.to(device), "teacher_weight": self.head}
        return {"teacher_topk_ids": top_ids.to(device), "teacher_topk_logprobs": top_lp.to(device)}


# ----------------------------------------------------------------------------- one run's fields
def inputs_spec(*, mode: str, tok, max_len: int, temperature: float, k: int, dtype: str,
                teacher: dict, data: DataSettings, keys: list[str]) -> dict:
    """The fields that name a cache's inputs (spec.json, and manifest.json with the results):
    a cache is read only by a run whose own fields match (`open_for_run`), and extended only
    by a `precompute_teacher` of the same ones."""
    return {"format": FORMAT, "mode": mode, "tokenizer": tokenizer_identity(tok), "max_len": max_len,
            "temperature": temperature if mode == "topk" else None,
            "k": k if mode == "topk" else None,
            "dtype": dtype if mode == "hidden" else None,
            "teacher": teacher, "data": data.manifest(), "records": records_identity(keys)}


def cached_keys(examples) -> list[str]:
    """The keys of the examples with a labelled position (those with rows), unique, in order."""
    keys = []
    for ex in examples:
        if labelled_positions(ex["labels"]):
            keys.append(example_key(ex["input_ids"], ex["labels"]))
    return list(dict.fromkeys(keys))


def open_for_run(path: str | Path, tok, train_examples, *, max_len: int, temperature: float,
                 teacher: TeacherSpec, data: DataSettings) -> TeacherOutputs:
    """The cache at `path` (--teacher-outputs), checked against this run before anything is
    written: tokenizer, max length, temperature (top-k), teacher (when the run names one;
    with `--teacher auto` only an auto-fitted teacher is checked), data and every training
    example. TeacherCacheError names the first field that does not match."""
    path = Path(path)
    manifest = open_manifest(path)
    run = {"tokenizer": tokenizer_identity(tok), "max_len": max_len, "temperature": temperature}
    fields = ["tokenizer", "max_len"] + (["temperature"] if manifest["mode"] == "topk" else [])
    check_matches(path, manifest, run, fields)
    if teacher.name != "auto" or manifest["teacher"].get("kind") == "auto-fit":
        check_matches(path, manifest, {"teacher": teacher_provenance(teacher, train_examples)}, ["teacher"])
    reader = TeacherOutputs(path, manifest)
    wanted = [(ex, example_key(ex["input_ids"], ex["labels"])) for ex in train_examples
              if labelled_positions(ex["labels"])]
    missing = [(ex, k) for ex, k in wanted if k not in reader.rows]
    if missing and len(missing) == len(wanted):
        check_matches(path, manifest, {"data": data.manifest()}, ["data"])
        raise TeacherCacheError(f"--teacher-outputs {path}: field \"data\": none of this run's "
                                f"{len(wanted)} labelled training examples is in the cache")
    if missing:
        raise TeacherCacheError(
            f"--teacher-outputs {path}: field \"records\": {len(missing)} of this run's {len(wanted)} "
            f"labelled training examples are not in the cache (first: {missing[0][0].get('origin')})")
    return reader
