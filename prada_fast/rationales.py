"""The teacher's own chain of thought: several sampled rationales per training question,
kept only where they reach the gold answer (Fine-tune-CoT's "diverse reasoning").

    python -m prada_fast.rationales --teacher DIR|PRESET --data SPEC --out FILE.jsonl
    torchrun --nproc_per_node N -m prada_fast.rationales ...     (questions split over ranks)

Per question: K samples (`--samples`, temperature / top-p sampling, batched `generate`
with left padding and the KV cache); the answer of each is read with the evaluation's own
checker (`data.format.grade`: the text after "The answer is"); a sample that states no
answer gets a second, greedy step that asks for it (Kojima et al.'s answer extraction). A
sample is kept when its answer matches the gold one, and once per distinct rationale.

Prompts (`--prompt`): `cot`, zero-shot chain of thought, "Q: {question}\\nA: Let's think
step by step." (inside the tokenizer's chat template when it has one); `prada`, the
trainer's own format "Q: {question}\\nA:", which a teacher fitted by prada_fast was taught;
`auto` (the default) takes `prada` for a preset or a teacher fitted by prada_fast, else
`cot`. `--prompt-template FILE` replaces the first step's prompt: a text with `{question}`.

Crash-safe: each rank appends one line per finished question to OUT.partial/rankR.jsonl
(flushed and synced); a rerun with the same flags skips the finished questions, and
sampling is seeded per batch of questions, so the result is that of an uninterrupted run,
and the same under any number of ranks. Rank 0 merges the parts into OUT (written to a
temporary file, then renamed) and OUT's `.summary.json`, then removes OUT.partial.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prada_fast.data import DataError, Record, load_spec
from prada_fast.data.format import ANSWER_MARKER, PROMPT, grade
from prada_fast.models import PRESETS, ModelError, load_causal_lm

COT_TRIGGER = "Let's think step by step."
PROMPTS = ("auto", "cot", "prada")
FIT_FILE = "prada_teacher_fit.json"  # written by teacher.fit_teacher into a fitted teacher


class RationaleError(ValueError):
    """Bad input to the command: one line, exit code 2."""


# ----------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class Prompter:
    """Stage 1 (the question, asking for reasoning) and stage 2 (the reasoning so far,
    asking for the answer) as text."""
    kind: str                      # "cot" | "prada" | "template"
    template: str | None = None    # --prompt-template's text, with {question}
    chat: object = None            # a tokenizer whose chat template wraps the question

    def first(self, question: str) -> str:
        if self.kind == "prada":
            return PROMPT.format(question=question)
        if self.kind == "template":
            return self.template.replace("{question}", question)
        if self.chat is not None:
            head = self.chat.apply_chat_template([{"role": "user", "content": question}],
                                                 tokenize=False, add_generation_prompt=True)
            return f"{head}{COT_TRIGGER}"
        return f"Q: {question}\nA: {COT_TRIGGER}"

    def second(self, question: str, rationale: str) -> str:
        return f"{self.first(question)} {rationale} {ANSWER_MARKER.strip()}"


def make_prompter(kind: str, template_file: str | None, teacher: str, tokenizer) -> Prompter:
    if template_file:
        path = Path(template_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RationaleError(f"--prompt-template {path}: cannot read it ({e})") from None
        if "{question}" not in text:
            raise RationaleError(f"--prompt-template {path}: no {{question}} placeholder")
        return Prompter("template", template=text.rstrip("\n"))
    if kind == "auto":
        fitted = teacher in PRESETS or (Path(teacher) / FIT_FILE).is_file()
        kind = "prada" if fitted else "cot"
    chat = tokenizer if kind == "cot" and getattr(tokenizer, "chat_template", None) else None
    return Prompter(kind, chat=chat)


def split_sample(text: str) -> tuple[str, bool]:
    """(the rationale of a generated text, whether it states an answer): the text before
    its last "The answer is" (the extractor's marker) within the first answer."""
    text = text.split("\nQ:", 1)[0]
    start = text.rfind(ANSWER_MARKER)
    if start < 0:
        return text.strip(), False
    return text[:start].strip(), True


# ----------------------------------------------------------------------------- generation
class HFGenerator:
    """transformers' `generate`: left-padded batches, the KV cache, sampling seeded per call."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tok, self.device = model.to(device).eval(), tokenizer, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        bos = self.tok.bos_token_id
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids

    @torch.no_grad()
    def __call__(self, prompts: list[str], n: int, *, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[tuple[str, int]]]:
        """Per prompt, n (text, generated tokens) pairs; temperature 0: greedy."""
        seqs = [self.encode(p) for p in prompts]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every prompt ends at column T
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        sample = temperature > 0
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(ids.repeat_interleave(n, 0).to(self.device),
                                      attention_mask=mask.repeat_interleave(n, 0).to(self.device),
                                      max_new_tokens=max_new_tokens,
                                      pad_token_id=self.pad, eos_token_id=self.tok.eos_token_id,
                                      use_cache=True, **kwargs)
        new = out[:, T:].cpu()
        results = []
        for row in new.tolist():
            eos = self.tok.eos_token_id
            n_tok = row.index(eos) + 1 if eos in row else len(row)
            results.append((self.tok.decode(row[:n_tok], skip_special_tokens=True), n_tok))
        return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator:
    """vLLM's offline engine (optional: installed, a GPU, a model directory)."""

    def __init__(self, path: str, seed: int):
        from vllm import LLM
        self.llm = LLM(model=path, seed=seed)

    def __call__(self, prompts, n, *, temperature, top_p, max_new_tokens, seed):
        from vllm import SamplingParams
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[(c.text, len(c.token_ids)) for c in o.outputs] for o in outs]


def use_vllm(engine: str, teacher: str) -> bool:
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if engine == "vllm" and not available:
        raise RationaleError("--engine vllm: needs the vllm package and a GPU")
    if engine == "vllm" and teacher in PRESETS:
        raise RationaleError("--engine vllm: needs a teacher directory, not a preset")
    return engine == "vllm" or (engine == "auto" and available and teacher not in PRESETS)


# ----------------------------------------------------------------------------- the work
@dataclasses.dataclass
class Question:
    index: int      # position in the (de-duplicated) question list
    record: Record


def load_questions(specs: list[str], skip_bad: bool, seed: int) -> list[Question]:
    """Every labelled question of the specs once (a repeated domain + question is dropped)."""
    records, seen = [], set()
    for spec in specs:
        recs, _ = load_spec(spec, skip_bad=skip_bad, seed=seed)
        for r in recs:
            if r.answer is None or (r.domain, r.question) in seen:
                continue
            seen.add((r.domain, r.question))
            records.append(r)
    if not records:
        raise RationaleError("--data: no question with a gold answer")
    return [Question(i, r) for i, r in enumerate(records)]


def make_batches(questions: list[Question], per_batch: int) -> list[list[Question]]:
    """Batches of one domain each (in the order of first appearance), `per_batch` questions:
    the same whatever the number of ranks, so that each batch's seed fixes its samples."""
    by_domain: dict[str, list[Question]] = {}
    for q in questions:
        by_domain.setdefault(q.record.domain, []).append(q)
    return [qs[i:i + per_batch] for qs in by_domain.values() for i in range(0, len(qs), per_batch)]


def judge(question: Record, samples: list[tuple[str, str, int]]) -> list[dict]:
    """Per sample (rationale, text graded, sample number): the extracted answer and whether
    it is kept (a match, not empty, not a repeat of an earlier kept rationale)."""
    seen, out = set(), []
    for rationale, text, k in samples:
        pred, ok = grade(text, question.answer)
        key = " ".join(rationale.split())
        status = "kept"
        if not ok:
            status = "no answer" if pred is None else "wrong"
        elif not key:
            status = "empty"
        elif key in seen:
            status = "duplicate"
        if status == "kept":
            seen.add(key)
        out.append({"sample": k, "rationale": rationale, "predicted": pred, "status": status})
    return out


def run_batch(gen, prompter: Prompter, batch: list[Question], args, seed: int) -> list[dict]:
    """Samples of every question of a batch, judged: one result line per question."""
    t0 = time.time()
    firsts = gen([prompter.first(q.record.question) for q in batch], args.samples,
                 temperature=args.temperature, top_p=args.top_p,
                 max_new_tokens=args.max_new_tokens, seed=seed)
    tokens = [sum(n for _, n in outs) for outs in firsts]
    pending = []  # samples that stated no answer: stage 2 asks for one
    staged: list[list] = []
    for qi, (q, outs) in enumerate(zip(batch, firsts)):
        rows = []
        for k, (text, _) in enumerate(outs):
            rationale, answered = split_sample(text)
            rows.append([rationale, text, k])
            if not answered and rationale:
                pending.append((qi, k, prompter.second(q.record.question, rationale)))
        staged.append(rows)
    if pending:
        answers = gen([p for _, _, p in pending], 1, temperature=0.0, top_p=1.0,
                      max_new_tokens=args.answer_tokens, seed=seed)
        for (qi, k, _), [(text, n)] in zip(pending, answers):
            staged[qi][k][1] = f"{staged[qi][k][0]} {ANSWER_MARKER.strip()}{text}"
            tokens[qi] += n
    seconds = (time.time() - t0) / len(batch)
    return [{"index": q.index, "domain": q.record.domain, "tokens": tokens[i],
             "seconds": round(seconds, 4), "samples": judge(q.record, [tuple(r) for r in staged[i]])}
            for i, q in enumerate(batch)]


# ----------------------------------------------------------------------------- files
def settings_of(args, n_questions: int) -> dict:
    """What the partial results depend on: a rerun must match it to reuse them."""
    keys = ("teacher", "data", "samples", "temperature", "top_p", "max_new_tokens",
            "answer_tokens", "batch_size", "seed", "prompt", "prompt_template")
    return {**{k: getattr(args, k) for k in keys}, "questions": n_questions}


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
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, meta)


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


def write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def print_summary(summary: dict, out: Path) -> None:
    print(f"{'domain':<14} {'questions':>9} {'with kept':>9} {'kept/q':>7} {'tokens/s':>9}  dropped")
    for name, d in summary["domains"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(d["dropped"].items())) or "-"
        print(f"{name:<14} {d['questions']:>9} {d['fraction_with_kept']:>9.2f} "
              f"{d['kept_per_question']:>7.2f} {d['tokens_per_s']:>9.1f}  {dropped}")
    print(f"{summary['records']} rationales -> {out}")


# ----------------------------------------------------------------------------- processes
@contextlib.contextmanager
def process_group(timeout_min: float):
    """(rank, world size, device) under any launcher (gloo for the barrier: only files are
    exchanged); a world of one without one."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
    try:
        yield (dist.get_rank() if world > 1 else 0), world, device
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def generate_all(args) -> int:
    out = Path(args.out)
    part_dir = out.with_name(out.name + ".partial")
    with process_group(args.dist_timeout) as (rank, world, device):
        if out.exists() and not args.overwrite:
            raise RationaleError(f"--out {out} exists: pass --overwrite to replace it")
        questions = load_questions(args.data, args.skip_bad, args.seed)
        settings = settings_of(args, len(questions))
        check_settings(part_dir, settings, rank)  # every rank: a refusal stops them all
        barrier()
        done = read_partial(part_dir)
        per_batch = max(1, args.batch_size // args.samples)
        batches = make_batches(questions, per_batch)
        mine = [(j, b) for j, b in enumerate(batches) if j % world == rank]
        todo = [(j, b) for j, b in mine if any(q.index not in done for q in b)]
        if rank == 0:
            resumed = f"; {len(done)} questions already done (resumed)" if done else ""
            print(f"[rationales] {len(questions)} questions, {args.samples} samples each, "
                  f"{len(batches)} batches over {world} rank(s){resumed}", flush=True)
        if todo:
            gen = build_generator(args, device)
            prompter = make_prompter(args.prompt, args.prompt_template, args.teacher, gen_tokenizer(gen))
            part = part_dir / f"rank{rank}.jsonl"
            total = sum(len(b) for _, b in mine)
            bar = tqdm(total=total, initial=total - sum(len(b) for _, b in todo),
                       desc=f"rationales (rank {rank})", unit="question",
                       disable=args.no_progress, dynamic_ncols=True, position=rank)
            with part.open("a", encoding="utf-8") as fh:
                if fh.tell() and not part.read_bytes().endswith(b"\n"):
                    fh.write("\n")  # after a line torn by a crash: start a fresh one
                for j, batch in todo:
                    rows = run_batch(gen, prompter, batch, args, seed=args.seed * 1_000_003 + j)
                    for row in rows:
                        if row["index"] in done:
                            continue
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                    bar.update(len(batch))
            bar.close()
        barrier()
        if rank == 0:
            merge(out, part_dir, questions, args)
        barrier()
    return 0


def gen_tokenizer(gen):
    return getattr(gen, "tok", None) or gen.llm.get_tokenizer()


def build_generator(args, device):
    if use_vllm(args.engine, args.teacher):
        return VLLMGenerator(args.teacher, args.seed)
    model, tok = load_causal_lm(args.teacher, attn="sdpa")
    return HFGenerator(model, tok, device)


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
    write_atomic(out, [json.dumps(r) + "\n" for r in records])
    write_atomic(summary_path(out), [json.dumps(summary, indent=2) + "\n"])
    for f in part_dir.iterdir():
        f.unlink()
    part_dir.rmdir()
    print_summary(summary, out)


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


# ----------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prada_fast.rationales",
        description="Sample chain-of-thought rationales from a teacher for every question of "
                    "--data, keep those whose answer matches the gold one, and write them as JSON "
                    "lines that the trainer's --data reads. Under torchrun or the deepspeed "
                    "launcher the questions are split over the ranks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="DIR|PRESET",
                   help=f"a local Hugging Face model directory, or a preset ({', '.join(PRESETS)}: "
                        "random weights, for tests)")
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="questions with gold answers, repeatable: the trainer's --data grammar "
                        "(synthetic[:N[:dom,..]], gsm8k*.jsonl, jsonl:PATH?question={Body} "
                        "{Question}&answer=Answer&domain=svamp, ...); rationale columns are not needed")
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="the kept rationales; FILE.summary.json gets the per-domain summary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--samples", type=int, default=4, metavar="K", help="rationales sampled per question")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature (0: greedy, one distinct sample)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per rationale")
    p.add_argument("--answer-tokens", type=int, default=16,
                   help="tokens of the answer-extraction step (a sample that states no answer)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per generate call (questions per batch: this / --samples)")
    p.add_argument("--prompt", choices=PROMPTS, default="auto",
                   help="cot: zero-shot chain of thought ('Let's think step by step.', in the "
                        "tokenizer's chat template when it has one); prada: 'Q: ...\\nA:', the "
                        "format a teacher fitted by prada_fast knows; auto: prada for such a "
                        "teacher (a preset, or a directory with prada_teacher_fit.json), else cot")
    p.add_argument("--prompt-template", metavar="FILE",
                   help="a text file with {question}: the first step's prompt instead of --prompt")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="hf: transformers' generate; vllm: vLLM's offline engine (needs vllm and "
                        "a GPU); auto: vllm when both are there and the teacher is a directory")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of synthetic data")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dist-timeout", type=float, default=30.0, metavar="MIN",
                   help="how long ranks wait for each other (the slowest rank's share)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by the deepspeed launcher; ignore")
    return p


def validate(args) -> None:
    checks = [(args.samples >= 1, "--samples must be >= 1"),
              (args.temperature >= 0, "--temperature must be >= 0"),
              (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
              (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
              (args.answer_tokens >= 1, "--answer-tokens must be >= 1"),
              (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.out.endswith(".jsonl"), "--out must name a .jsonl file")]
    for ok, message in checks:
        if not ok:
            raise RationaleError(message)
    if args.teacher not in PRESETS and not Path(args.teacher).is_dir():
        raise RationaleError(f"--teacher {args.teacher}: not a preset ({', '.join(PRESETS)}) "
                             "and not a directory")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        return generate_all(args)
    except (RationaleError, DataError, ModelError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
