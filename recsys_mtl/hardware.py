"""What this machine's chips do fast, for the settings that say "auto" (`train.bf16`, `text.dtype`)."""

import functools
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix instructions (Intel AMX, AVX-512 BF16)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16(device: torch.device) -> str:
    """Why bf16 matmuls are native on `device` (a CPU flag, or a CUDA GPU with bf16), or "" where they are not."""
    if device.type == "cuda":
        return "a CUDA GPU with bf16" if torch.cuda.is_bf16_supported() else ""
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    return f"the CPU has {found[0]}" if found else ""


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """A bf16 setting (true, false or "auto": where `native_bf16`) resolved for `device`."""
    return setting if isinstance(setting, bool) else bool(native_bf16(device))


def bf16_choice(setting: bool | str, device: torch.device) -> str:
    """The resolved setting with its reason, for the log."""
    if isinstance(setting, bool):
        return f"bf16 autocast {'on' if setting else 'off'} (set)"
    reason = native_bf16(device)
    return f"bf16 autocast on (auto: {reason})" if reason else "bf16 autocast off (auto: no native bf16 on this device)"
