import io
import json
import os
import pickle
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

import recsys_mtl.checkpoint as checkpoint_module
from recsys_mtl.checkpoint import Progress, load_checkpoint, read_progress, save_checkpoint, trained_checkpoint
from recsys_mtl.cli import main
from recsys_mtl.errors import InputError, MissingInputError
from recsys_mtl.train import train
from tests.conftest import tiny_config

DATA_FILE = "__0_0.distcp"  # where DCP stores the tensors of a 1-rank save


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 3), value), "b": torch.arange(5.0) * value}, "rng": torch.get_rng_state()}


def _loaded(path: Path) -> dict:
    state = _state(0.0)
    load_checkpoint(path, state)
    return state


@pytest.fixture
def last(tmp_path: Path) -> Path:
    """A checkpoint written by save_checkpoint: step 7, model tensors of 7.0."""
    path = tmp_path / "checkpoints" / "last"
    save_checkpoint(path, _state(7.0), Progress({"tasks": ["ctr"]}, step=7))
    return path


def _touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _dotted_global_attack(metadata: bytes, marker: Path) -> bytes:
    """The checkpoint's own metadata pickle, preceded by opcodes that reach os.system through a dotted name under an
    allowed module (`torch.distributed.checkpoint.metadata` imports os) and run `touch marker`."""
    call = b"ctorch.distributed.checkpoint.metadata\nos.system\n(V" + _touch(marker).encode() + b"\ntR0"
    assert metadata.startswith(b"\x80\x04")
    return metadata[:2] + call + metadata[2:]


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (_touch(self.marker),))


def _bytes_item_attack(folder: Path, marker: Path) -> None:
    """Turn the `rng` entry of the checkpoint in `folder` into a bytes item whose payload, once torch.load()ed without
    weights_only (DCP's default planner), runs `touch marker`; progress.json's checksums are made to match."""
    payload = io.BytesIO()
    torch.save(_Touch(marker), payload)
    (folder / "__evil.distcp").write_bytes(payload.getvalue())
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file: plain pickle is fine here
    metadata.state_dict_metadata["rng"] = BytesStorageMetadata()
    info = _StorageInfo("__evil.distcp", 0, len(payload.getvalue()))
    metadata.storage_data[MetadataIndex("rng")] = info
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    progress = json.loads((folder / "progress.json").read_text())
    progress["checksums"] |= checkpoint_module._checksums(folder, metadata)
    (folder / "progress.json").write_text(json.dumps(progress))


def test_a_checkpoint_loads_back_exactly(last: Path) -> None:
    assert last.is_symlink()
    assert last.readlink() == Path("last.0")
    loaded = _loaded(last)
    torch.testing.assert_close(loaded["model"]["w"], torch.full((4, 3), 7.0), rtol=0, atol=0)
    torch.testing.assert_close(loaded["model"]["b"], torch.arange(5.0) * 7, rtol=0, atol=0)
    progress = read_progress(last, {"tasks": ["ctr"]})
    assert (progress.step, progress.epoch, progress.best) == (7, 0, None)
    stored = checkpoint_module.read_metadata(last).storage_data.values()
    assert progress.checksums.keys() == {f"{DATA_FILE}@{info.offset}" for info in stored}
    assert len(progress.checksums) == 3  # w, b and rng


class _Kill(BaseException):
    """A kill: the save stops where it is, and no handler runs."""


def _killed_at_line(line: int) -> Callable:
    """A trace function that raises _Kill before the `line`-th line that save_checkpoint itself executes."""
    executed = 0

    def local(frame, event, arg):
        nonlocal executed
        if event == "line":
            executed += 1
            if executed == line:
                raise _Kill
        return local

    return lambda frame, event, arg: local if frame.f_code is save_checkpoint.__code__ else None


def test_a_kill_at_any_line_of_a_save_leaves_a_whole_latest_checkpoint(last: Path) -> None:
    latest, line = 7, 0
    while True:
        line += 1
        new = 100 + line
        sys.settrace(_killed_at_line(line))
        try:
            save_checkpoint(last, _state(float(new)), Progress({"tasks": ["ctr"]}, step=new))
            killed = False
        except _Kill:
            killed = True
        finally:
            sys.settrace(None)
        step = read_progress(last, {"tasks": ["ctr"]}).step
        assert step in (latest, new), f"killed before line {line}"
        torch.testing.assert_close(_loaded(last)["model"]["w"], torch.full((4, 3), float(step)), rtol=0, atol=0)
        latest = step
        if not killed:
            break
    assert line > 10  # every line of the rotation was a kill point
    assert latest == new
    assert sorted(p.name for p in last.parent.iterdir()) == sorted(["last", last.readlink().name])


def test_a_dotted_global_in_the_metadata_is_refused_and_never_run(last: Path, tmp_path: Path) -> None:
    shown = tmp_path / "shown"
    attack = _dotted_global_attack((last / ".metadata").read_bytes(), shown)
    assert type(pickle.loads(attack)).__name__ == "Metadata"  # plain pickle loads it as metadata, and runs the call
    assert shown.exists()

    marker = tmp_path / "marker"
    (last / ".metadata").write_bytes(_dotted_global_attack((last / ".metadata").read_bytes(), marker))
    with pytest.raises(InputError) as refused:
        load_checkpoint(last, _state(0.0))
    assert str(refused.value) == (
        f"{last / '.metadata'}: refers to torch.distributed.checkpoint.metadata.os.system, which checkpoint metadata "
        "may not hold (not a recsys-mtl checkpoint, or tampered with)"
    )
    assert not marker.exists()


def test_a_bytes_item_in_the_metadata_is_refused_and_never_unpickled(
    last: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    _bytes_item_attack(last.resolve(), marker)
    with pytest.raises(InputError, match=f"^{last / '.metadata'}: entry 'rng' is a pickled object; recsys-mtl"):
        load_checkpoint(last, _state(0.0))
    assert not marker.exists()

    # defence in depth: with the metadata check gone, the load planner still refuses the item
    monkeypatch.setattr(
        checkpoint_module, "read_metadata", lambda folder: pickle.loads((folder / ".metadata").read_bytes())
    )
    with pytest.raises(InputError, match=f"^{last}: entry 'rng' is a pickled object; recsys-mtl checkpoints hold"):
        load_checkpoint(last, _state(0.0))
    assert not marker.exists()

    shown = tmp_path / "shown"  # the same files, loaded by DCP's defaults, run the payload
    _bytes_item_attack(last.resolve(), shown)
    dcp.load(_state(0.0), checkpoint_id=last, no_dist=True)
    assert shown.exists()


def _rewrite_metadata(folder: Path, change: Callable) -> None:
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _store_outside(metadata) -> None:
    for info in metadata.storage_data.values():
        info.relative_path = "../outside.distcp"


DAMAGES = {
    "garbage metadata": (
        lambda f: (f / ".metadata").write_bytes(b"\x80\x04garbage" * 9),
        ".metadata",
        "not checkpoint metadata",
    ),
    "metadata of something else": (
        lambda f: (f / ".metadata").write_bytes(pickle.dumps([1, 2])),
        ".metadata",
        r"not checkpoint metadata \(a list\)",
    ),
    "missing metadata": (lambda f: (f / ".metadata").unlink(), ".metadata", "no such file"),
    "tensors stored outside": (
        lambda f: _rewrite_metadata(f, _store_outside),
        ".metadata",
        "outside the checkpoint folder",
    ),
    "missing data": (lambda f: (f / DATA_FILE).unlink(), DATA_FILE, "missing, or not a plain file"),
    "truncated data": (lambda f: os.truncate(f / DATA_FILE, 1000), DATA_FILE, "truncated: a tensor ends at byte"),
    "corrupt data": (lambda f: _flip_a_byte(f / DATA_FILE), DATA_FILE, "does not match its checksum in progress.json"),
    "missing progress": (lambda f: (f / "progress.json").unlink(), "", r"no checkpoint \(progress.json missing\)"),
    "progress not json": (lambda f: (f / "progress.json").write_text("{"), "progress.json", "not valid JSON"),
    "progress tampered": (
        lambda f: (f / "progress.json").write_text('{"fingerprint": {}, "step": -3}'),
        "progress.json",
        "must be >= 0",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_naming_the_file(last: Path, damage: str) -> None:
    change, file, message = DAMAGES[damage]
    folder = last.resolve()
    change(folder)
    with pytest.raises(InputError, match=message) as refused:
        load_checkpoint(folder, _state(0.0))
    assert str(refused.value).startswith(str(folder / file))
    assert isinstance(refused.value, MissingInputError) == damage.startswith("missing")


def test_the_command_line_refuses_an_attacked_checkpoint_in_one_line(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(tiny_config(text_dataset, tiny_bert, train={"max_steps": 2}), run, torch.device("cpu"), progress=False)
    checkpoint = trained_checkpoint(run)
    assert checkpoint == (run / "checkpoints" / "last.0").resolve()  # no validation: no best
    marker = tmp_path / "marker"
    (checkpoint / ".metadata").write_bytes(_dotted_global_attack((checkpoint / ".metadata").read_bytes(), marker))
    refusal = f"{checkpoint / '.metadata'}: refers to torch.distributed.checkpoint.metadata.os.system, which"
    commands = {
        "evaluate": ["evaluate", str(run)],
        "score": ["score", str(run), str(text_dataset), "--out", str(tmp_path / "scores"), "--quiet"],
        "train": ["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "--quiet"],
    }
    for command, args in commands.items():
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"recsys-mtl {command}: error: {refusal}")
        assert err.count("\n") == 1
    assert not marker.exists()
    assert not (tmp_path / "scores").exists()
