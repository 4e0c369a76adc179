"""Where the Triton kernels run: compiled on CUDA, or under Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set before triton is imported). Shared by the kernel launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs  # triton >= 3.4
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse CPU tensors unless the interpreter is on (a compiled kernel cannot read them)."""
    if not interpreting() and any(t.device.type == "cpu" for t in tensors):
        raise RuntimeError("prada_kernels: CPU tensors need the Triton interpreter; set "
                           "TRITON_INTERPRET=1 before importing triton (or use impl='chunked')")
