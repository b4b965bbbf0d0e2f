from dataclasses import dataclass, field
from typing import Literal

import pytest

from recsys_mtl.errors import InputError
from recsys_mtl.structs import from_mapping, to_mapping


@dataclass(frozen=True)
class Inner:
    name: str
    size: int = 4


@dataclass(frozen=True)
class Outer:
    kind: Literal["a", "b"]
    items: tuple[Inner, ...] = ()
    rate: float = 0.5
    extra: dict[str, Inner] = field(default_factory=dict)
    note: str | None = None


def test_nested_tables_build_and_round_trip() -> None:
    data = {"kind": "a", "items": [{"name": "x"}, {"name": "y", "size": 8}], "rate": 1, "extra": {"k": {"name": "z"}}}
    built = from_mapping(Outer, data, "f.toml")
    assert built == Outer("a", (Inner("x"), Inner("y", 8)), 1.0, {"k": Inner("z")})
    assert from_mapping(Outer, to_mapping(built), "again") == built


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "c"}, r"kind in f.toml: expected one of \['a', 'b'\], got 'c'"),
        ({"kind": "a", "items": [{"name": "x", "sise": 3}]}, r"unknown key items\[0\].sise in f.toml"),
        ({"kind": "a", "items": [{}]}, r"missing key items\[0\].name in f.toml"),
        ({"kind": "a", "rate": "fast"}, "rate in f.toml: expected float, got 'fast'"),
        ({"kind": "a", "items": [{"name": "x", "size": True}]}, r"items\[0\].size in f.toml: expected int, got True"),
        ({}, "missing key kind in f.toml"),
        ({"kind": "a", "rate": float("inf")}, "rate in f.toml: expected a finite number, got inf"),
        ({"kind": "a", "rate": float("nan")}, "rate in f.toml: expected a finite number, got nan"),
    ],
)
def test_bad_tables_are_refused_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        from_mapping(Outer, data, "f.toml")
