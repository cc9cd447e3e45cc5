import random

import numpy as np
import pytest
import torch

import instseg.engine.checkpoint as ckpt_mod
from instseg.engine.checkpoint import (
    FORMAT,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(value: float) -> dict:
    return {"format": FORMAT, "model": {"w": torch.full((3,), value)}, "iter": 7, "config": {}}


def test_save_then_load_roundtrip(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, _state(1.5))
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no .tmp left behind
    state = load_checkpoint(path)
    assert state["iter"] == 7 and torch.equal(state["model"]["w"], torch.full((3,), 1.5))


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3,), 1.0))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not an instseg checkpoint"):
        load_checkpoint(other)
    mm = tmp_path / "mm.pt"
    torch.save({"model": {}, "format": "mmdet"}, mm)
    with pytest.raises(CheckpointError, match="convert mmdet"):
        load_checkpoint(mm)


def test_rng_state_roundtrip_through_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "r.pt", {"format": FORMAT, "model": {}, "rng": capture_rng_state()})
    expected = (torch.rand(4), np.random.standard_normal(3), [random.random() for _ in range(3)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(4), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
