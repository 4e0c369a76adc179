"""prada_fast: PRADA chain-of-thought distillation with fused loss kernels and ZeRO-3.

The loss op lives in `prada_fast.op`; the trainer is `prada_fast/train.py` and the modules
beside it; the data pipeline is `prada_fast.data`; the comparison is `prada_fast.experiments`.
"""
from .op import LossOptions, PradaLoss, dann_lambda, grad_reverse, lambda_at, prada_loss

__version__ = "0.1.0"
__all__ = ["LossOptions", "PradaLoss", "__version__", "dann_lambda", "grad_reverse", "lambda_at",
           "prada_loss"]
