"""PRADA against plain chain-of-thought distillation: same steps, data and seeds.

    python -m prada_fast.experiments.compare                     # synthetic, CPU
    python -m prada_fast.experiments.compare --tune --seeds 0,1,2,3,4 \\
        --data synthetic:400:shopping,travel,recipes,garden --targets all   # the full protocol
    python -m prada_fast.experiments.compare --data data/gsm8k_train.jsonl#400 \\
        --data data/strategyqa_train.json#400 --data data/aqua_dev.json \\
        --targets aqua --extra "--max-len 512"

Five variants are trained by `prada_fast/train.py`, one subprocess per (target, variant,
seed), leave-one-domain-out (the target domain is unlabelled, every other domain is a
labelled source):

  cot              (a) plain CoT distillation:       --prompt-len 0 --no-domain-loss
  grl              (b) adversarial only, GRL:        --prompt-len 0 --adversary grl
  confusion        (c) adversarial only, confusion:  --prompt-len 0 --adversary confusion
  prada-grl        (d) PRADA, GRL:                   --prompt-len K --adversary grl
  prada-confusion  (e) PRADA, confusion:             --prompt-len K --adversary confusion

The adversarial variants also get --lambda-max, --domain-head-lr-mult and (PRADA) the
prompt encoder: given as flags, or chosen per target by --tune on a pseudo-target split of
the sources, never on the target's records. The report gives per variant the mean over
seeds and the paired difference against (a) with its 95 % t-interval.

Runs of the same seed share one teacher cache, so a seed's teacher is fitted once and every
variant of that seed distils from the same teacher, in the same data order. Finished runs
(summary.json present) are reused: rerunning the same command continues an interrupted
experiment. The report goes to OUTPUT_DIR/report.md and report.json, with PNG plots.

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
