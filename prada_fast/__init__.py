"""prada_fast: PRADA chain-of-thought distillation with fused loss kernels and ZeRO-3."""
from .grl import dann_lambda, grad_reverse, lambda_at
from .loss import prada_loss

__version__ = "0.1.0"
__all__ = ["__version__", "dann_lambda", "grad_reverse", "lambda_at", "prada_loss"]
