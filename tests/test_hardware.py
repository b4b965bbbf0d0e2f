"""bf16 = "auto": decided from the chip's flags (train.bf16, text.dtype), forced by true / false; glibc's malloc
keeping what tensors free."""

import platform
import subprocess
import sys

import pytest
import torch

import recsys_mtl.hardware as hardware
from recsys_mtl.config import TextConfig
from recsys_mtl.text import accepted_ids, model_id, text_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "setting", "expected", "said"),
    [
        ({"avx2", "amx_bf16", "avx512_bf16"}, "auto", True, "bf16 autocast on (auto: the CPU has amx_bf16)"),
        ({"avx2", "avx512f", "avx512_bf16"}, "auto", True, "bf16 autocast on (auto: the CPU has avx512_bf16)"),
        ({"avx2", "avx512f"}, "auto", False, "bf16 autocast off (auto: no native bf16 on this device)"),
        (set(), "auto", False, "bf16 autocast off (auto: no native bf16 on this device)"),
        ({"amx_bf16"}, False, False, "bf16 autocast off (set)"),
        (set(), True, True, "bf16 autocast on (set)"),
    ],
)
def test_bf16_auto_follows_the_cpu_flags_and_true_or_false_force_it(
    monkeypatch: pytest.MonkeyPatch, flags: set, setting: bool | str, expected: bool, said: str
) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.use_bf16(setting, CPU) is expected
    assert hardware.bf16_choice(setting, CPU) == said


def test_text_auto_runs_bf16_where_native_and_takes_vectors_of_either_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    auto, fp32 = TextConfig(model="m"), TextConfig(model="m", dtype="float32")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert text_dtype(auto, CPU) == "bfloat16"
    assert text_dtype(fp32, CPU) == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert text_dtype(auto, CPU) == "float32"
    assert accepted_ids(auto) == {"m@float32@128", "m@bfloat16@128"}
    assert accepted_ids(fp32) == {model_id(fp32, "float32")} == {"m@float32@128"}


def test_this_machines_flags_are_read() -> None:
    flags = hardware.cpu_flags()
    assert not flags or "fpu" in flags or "fp" in flags  # x86 lists fpu; empty where /proc/cpuinfo is absent


REFILL = """
import resource, sys, torch
from recsys_mtl.hardware import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.ones(4 << 20)  # 16 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(2 << 20)  # 8 MB: pages faulted in anew, unless the freed ones are reused
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refill_faults(mode: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", REFILL, mode], capture_output=True, text=True, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    assert _refill_faults("keep") == ("True", pytest.approx(0, abs=500))
    _, faults = _refill_faults("default")
    assert faults > 1_500  # 8 MB in 4 KB pages: 2k faults when glibc has handed the memory back
