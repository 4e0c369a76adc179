"""PRADA against plain chain-of-thought distillation: same steps, data and seeds.

    python -m prada_fast.experiments.compare                     # synthetic, CPU
    python -m prada_fast.experiments.compare --tune --seeds 0,1,2,3,4 \\
        --data synthetic:400:shopping,travel,recipes,garden --targets all   # the full protocol
    python -m prada_fast.experiments.compare --data data/gsm8k_train.jsonl#400 \\
        --data data/strategyqa_train.json#400 --data data/aqua_dev.json \\
        --targets aqua --extra "--max-len 512"

The arms are trained by `prada_fast/train.py`, one subprocess per (target, variant, seed),
leave-one-domain-out (the target domain is unlabelled, every other domain is a labelled
source). By default the four arms of the fair test:

  cot                 (A) plain CoT distillation:     --prompt-len 0 --no-domain-loss
  cot-lm              (B) CoT + the LM term:          (A) + --lm-weight W (every domain's
                          questions, the target's unlabelled ones included)
  prada-confusion     (C) PRADA:                      --prompt-len K --adversary confusion
  prada-confusion-lm  (D) PRADA + the LM term:        (C) + --lm-weight W

and on request (--variants) grl, confusion (an adversary alone, --prompt-len 0), prada-grl
and prada-grl-lm. PRADA helps only where (C) or (D) beats (B): (B) uses the target's text too.

The knobs (--lambda-max, --domain-head-lr-mult, the prompt encoder, --lm-weight) are given
as flags, or chosen per target by --tune on a pseudo-target split of the sources, never on
the target's records. The report gives per arm the mean over seeds and the paired
differences against (A) and against (B) with their 95 % t-intervals, the verdict against
(B), and the trainer's fresh probe on every layer's pooled features before and after.

One teacher for all seeds (--teacher-seed, the default): every run gets the same data, held-
out split and teacher, so the seeds vary the student (its init and data order) only; the auto
teacher is fitted once per target. --teacher-per-seed restores a teacher and data set per
seed. Finished runs (summary.json, and final/ or the run's record) are reused and an
unfinished one resumes from its latest checkpoint (--save-every): rerunning the same command
continues an interrupted experiment; with --drop-weights a finished run keeps its record
only, enough for the report, so the experiment's directory can move to another machine.
The report goes to OUTPUT_DIR/report.md and report.json, with PNG plots.

The code, by seam: flags.py (the command's flags), variants.py (the compared trainer
configurations), runs.py (one run: its flags, training or reusing it, what it measured),
tuning.py (--tune), statistics.py (over seeds, paired differences, ci95), report.py
(report.json, report.md, plots), command.py (main; __main__.py runs it).
"""
from .command import main
from .flags import parse_args
from .runs import trainer_args
from .statistics import ci95
from .variants import variants

__all__ = ["ci95", "main", "parse_args", "trainer_args", "variants"]
