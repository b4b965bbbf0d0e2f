"""bf16 = "auto": decided from the chip's flags (train.bf16, text.dtype), forced by true / false."""

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
