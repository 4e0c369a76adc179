"""The PRADA loss op, apart from the trainer.

- `options.py`: `LossOptions`, the op's keyword arguments as one frozen, checked object;
- `api.py`: `prada_loss` (checks, dispatch) and `PradaLoss` (its `nn.Module`);
- `reference.py`: the objective in plain PyTorch, materialising the logits (the oracle);
- `driver.py`: the never-materialise chunk driver and `RowBackend`, its interface;
- `torch_backend.py`: the driver's PyTorch backend (impl "chunked"); the Triton backend is
  `kernels/` (`prada_kernels`);
- `adversary.py`: the adversaries (gradient reversal, domain confusion) and the schedules
  of their scale lambda (`adv_lambda`);
- `testing.py`: parity tolerances, `rel_err` and random inputs, for tests and benchmarks.

docs/design.md states the objective and the contract that all of them implement.
"""
from .api import IMPL_NAMES, PradaLoss, prada_loss, resolve_impl
from .adversary import confusion_term, dann_lambda, grad_reverse, lambda_at
from .options import IGNORE_INDEX, LossOptions
from .reference import masked_mean

__all__ = ["IGNORE_INDEX", "IMPL_NAMES", "LossOptions", "PradaLoss", "confusion_term", "dann_lambda",
           "grad_reverse", "lambda_at", "masked_mean", "prada_loss", "resolve_impl"]
