"""The command `python -m prada_fast.rationales` (sampled teacher rationales, kept when
their answer is the gold one): its code is the package prada_fast.teacher.rationales,
whose docstring describes it; this module is the entry point and keeps its names."""
from __future__ import annotations

import sys

from prada_fast.teacher.rationales import *  # noqa: F401,F403
from prada_fast.teacher.rationales import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
