"""`python -m prada_fast.experiments.compare`."""
import sys

from prada_fast.experiments.compare.command import main

sys.exit(main())
