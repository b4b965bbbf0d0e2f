"""What this machine's chips do fast, for the settings that say "auto" (`train.bf16`, `text.dtype`), and how the
process uses its memory."""

import ctypes
import functools
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix instructions (Intel AMX, AVX-512 BF16)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_LARGEST_BYTES = 32 << 20  # glibc's upper bound on the mmap threshold: larger blocks are still mapped
KEPT_FREE_BYTES = 256 << 20  # free memory at the top of the heap that glibc keeps instead of returning it


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


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse the memory that tensors free instead of handing it back to the kernel.

    By default blocks above 128 KB are fresh mmaps (the threshold adapts upwards as they are freed) and free memory
    above twice that is returned to the kernel, so each step's activations fault their pages in again: 6-8k page
    faults a step at batch 2048-4096 and 127k at batch 16384 for the demo config, up to 40% of the step spent in the
    kernel (README, "Memory a step reuses"). Blocks up to `HEAP_LARGEST_BYTES` now come from the heap, which keeps up
    to `KEPT_FREE_BYTES` free for the next step. Process-wide, once; False where the C library is not glibc (nothing
    changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_LARGEST_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
    )
