"""What a result was measured with: the installed versions and the machine. Recorded by the
benchmarks (`benchmarks/`) and the comparison experiment (`prada_fast.experiments.compare`)."""
from __future__ import annotations

import os
import platform
from importlib import metadata

# the packages whose versions a result records (distribution names; None where not installed)
PACKAGES = ("torch", "triton", "transformers", "deepspeed", "liger_kernel", "cut_cross_entropy",
            "numpy", "matplotlib", "prada_fast")


def versions(packages=PACKAGES) -> dict:
    """Python's version and each package's installed version (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """CPU cores, torch threads, platform, CPU model, memory (GiB) and the GPU, if any."""
    import torch

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
        info["mem_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):  # not Linux
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
