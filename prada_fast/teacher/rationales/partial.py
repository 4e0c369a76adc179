"""The files of `python -m prada_fast.rationales`: each rank's part file of finished
questions under OUT.partial (with the settings they were made with), and rank 0's merge
of them into OUT and its summary."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prada_fast.common.files import write_json_atomic, write_jsonl_atomic
from prada_fast.models import PRESETS

from .generators import RationaleError
from .questions import Question


def settings_of(args, n_questions: int) -> dict:
    """What the partial results depend on: a rerun must match it to reuse them."""
    keys = ("teacher", "data", "samples", "sample_temperature", "top_p", "max_new_tokens",
            "answer_tokens", "batch_size", "seed", "prompt", "prompt_template")
    settings = {k: getattr(args, k) for k in keys}
    # the key of --sample-temperature keeps its old name: partial results of an earlier
    # release still match, and the summary's settings read as before
    settings = {("temperature" if k == "sample_temperature" else k): v for k, v in settings.items()}
    return {**settings, "questions": n_questions}


def read_partial(part_dir: Path) -> dict[int, dict]:
    """Finished questions of every rank's part file, by index; a torn last line (a crash
    mid-write) is ignored: that question is redone."""
    done: dict[int, dict] = {}
    for path in sorted(part_dir.glob("rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["index"]] = row
    return done


def check_settings(part_dir: Path, settings: dict, rank: int) -> None:
    """Refuse an OUT.partial left by other flags; rank 0 claims a new one for these
    settings (written whole, by a rename: another rank reads it whole or not at all)."""
    meta = part_dir / "settings.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != settings:
            diff = ", ".join(k for k in settings if old.get(k) != settings[k])
            raise RationaleError(f"{part_dir} holds partial results made with other settings "
                                 f"({diff}): rerun with the same flags, or delete it")
    elif rank == 0:
        part_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(meta, settings, indent=1)


def teacher_identity(teacher: str) -> str:
    """The preset's name, or the directory with a short hash of its config and weights' sizes."""
    if teacher in PRESETS:
        return teacher
    path = Path(teacher).resolve()
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{path}@{h.hexdigest()[:12]}"


def output_records(questions: list[Question], done: dict[int, dict], teacher: str) -> list[dict]:
    records = []
    for q in questions:
        for s in done[q.index]["samples"]:
            if s["status"] == "kept":
                r = q.record
                records.append({"question": r.question, "rationale": s["rationale"],
                                "answer": r.answer, "domain": r.domain, "sample": s["sample"],
                                "teacher": teacher, "origin": r.origin})
    return records


def summarise(questions: list[Question], done: dict[int, dict], samples: int) -> dict:
    """Per domain: questions, the fraction with at least one kept rationale, kept samples
    per question, why samples were dropped, generated tokens and tokens per second."""
    per: dict[str, dict] = {}
    for q in questions:
        row = done[q.index]
        d = per.setdefault(q.record.domain, {"questions": 0, "with_kept": 0, "kept": 0,
                                             "dropped": {}, "tokens": 0, "seconds": 0.0})
        kept = sum(s["status"] == "kept" for s in row["samples"])
        d["questions"] += 1
        d["with_kept"] += kept > 0
        d["kept"] += kept
        for s in row["samples"]:
            if s["status"] != "kept":
                d["dropped"][s["status"]] = d["dropped"].get(s["status"], 0) + 1
        d["tokens"] += row["tokens"]
        d["seconds"] += row["seconds"]
    for d in per.values():
        d["fraction_with_kept"] = round(d["with_kept"] / d["questions"], 4)
        d["kept_per_question"] = round(d["kept"] / d["questions"], 4)
        d["tokens_per_s"] = round(d["tokens"] / max(d["seconds"], 1e-9), 1)
        d["seconds"] = round(d["seconds"], 2)
    return {"samples_per_question": samples, "domains": per,
            "records": sum(d["kept"] for d in per.values())}


def print_summary(summary: dict, out: Path) -> None:
    print(f"{'domain':<14} {'questions':>9} {'with kept':>9} {'kept/q':>7} {'tokens/s':>9}  dropped")
    for name, d in summary["domains"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(d["dropped"].items())) or "-"
        print(f"{name:<14} {d['questions']:>9} {d['fraction_with_kept']:>9.2f} "
              f"{d['kept_per_question']:>7.2f} {d['tokens_per_s']:>9.1f}  {dropped}")
    print(f"{summary['records']} rationales -> {out}")


def merge(out: Path, part_dir: Path, questions: list[Question], args) -> None:
    """Rank 0: every question's result into OUT and its summary, then OUT.partial goes."""
    done = read_partial(part_dir)
    missing = [q.index for q in questions if q.index not in done]
    if missing:
        raise RationaleError(f"{len(missing)} questions have no result in {part_dir} (a rank "
                             "stopped early?): rerun the same command to finish them")
    teacher = teacher_identity(args.teacher)
    records = output_records(questions, done, teacher)
    summary = summarise(questions, done, args.samples)
    summary.update({"teacher": teacher, "settings": settings_of(args, len(questions))})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, records)
    write_json_atomic(summary_path(out), summary)
    for f in part_dir.iterdir():
        f.unlink()
    part_dir.rmdir()
    print_summary(summary, out)


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
