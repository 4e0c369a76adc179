"""Which teacher a run distils from (`TeacherSpec`, the --teacher flags), what names it in
a teacher cache (`teacher_provenance`), and the model itself (`resolve_teacher`): a local
directory, a preset, or, with `auto` and a preset student, the small teacher fitted on the
labelled rationales and cached on disk (teacher/fit.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prada_fast.common import distributed as dist_util
from prada_fast.models import PRESETS, load_causal_lm
from prada_fast.teacher.fit import AUTO_PRESET, FIT_BATCH, cache_key, default_cache_dir, fit_teacher

# A preset teacher's random init is seeded with the teacher's seed + this, never the student's.
TEACHER_SEED_OFFSET = 7


@dataclass(frozen=True)
class TeacherSpec:
    """name: "auto" (fit AUTO_PRESET for a preset student), "none", a preset or a directory;
    steps, lr: the auto fit's; seed: the teacher's (--teacher-seed; default the run's --seed):
    it seeds the auto fit and, + TEACHER_SEED_OFFSET, a preset teacher's init; fit_cache: the
    auto fits' folder (None: fit.default_cache_dir())."""
    name: str = "auto"
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0
    fit_cache: str | None = None

    @property
    def init_seed(self) -> int:
        return self.seed + TEACHER_SEED_OFFSET


def teacher_provenance(spec: TeacherSpec, train_examples) -> dict:
    """What names the teacher of a run in a teacher cache's manifest: the auto fit's key (its
    preset, settings and training examples), a preset's name and init seed, or a hash of a
    model directory's files."""
    from prada_fast.teacher.cache import directory_hash
    if spec.name == "auto":
        return {"kind": "auto-fit", "preset": AUTO_PRESET,
                "fit_key": cache_key(AUTO_PRESET, train_examples, spec.steps, spec.lr, FIT_BATCH,
                                     spec.seed)}
    if spec.name in PRESETS:
        return {"kind": "preset", "name": spec.name, "init_seed": spec.init_seed}
    return {"kind": "directory", "sha256": directory_hash(Path(spec.name))}


def resolve_teacher(spec: TeacherSpec, student: str, tok, train_examples, collate, *,
                    attn: str = "auto", show_progress: bool = True, log=print):
    """The teacher model, or None (no KD). "auto" with a preset student: rank 0 fits (or
    finds cached) AUTO_PRESET on the training examples, the other ranks wait for its path."""
    choice = spec.name
    if choice == "none":
        return None
    if choice == "auto":
        if student not in PRESETS:
            log("no --teacher given for a non-preset student: training without KD")
            return None
        cache = Path(spec.fit_cache) if spec.fit_cache else default_cache_dir()
        path = None
        if dist_util.rank() == 0:
            with dist_util.all_threads():
                path = fit_teacher(AUTO_PRESET, tok, train_examples, collate, steps=spec.steps,
                                   lr=spec.lr, batch=FIT_BATCH, seed=spec.seed, cache_dir=cache,
                                   show_progress=show_progress, log=log)
        choice = str(dist_util.wait_for_rank0("teacher", path))
    teacher, _ = load_causal_lm(choice, tokenizer=tok, attn=attn, seed=spec.init_seed)
    return teacher  # frozen by build_engines
