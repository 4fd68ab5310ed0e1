"""Resuming reads nothing from the workdir that could run code: checkpoints hold tensors, JSON and a checked pickle."""

import os
import pickle

import pytest
import torch

from pipeline.distill.sharding import metadata_checked_reader
from pipeline.errors import StageError

pytestmark = pytest.mark.hostile


def test_a_torch_checkpoint_round_trips_through_the_checked_reader(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {
        "model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)},
        "optimizer": {"step": torch.tensor(7)},
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    back = {
        "model": {"w": torch.zeros(3, 4), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer": {"step": torch.tensor(0)},
    }
    dcp.load(back, storage_reader=metadata_checked_reader(tmp_path / "ckpt"))
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and torch.equal(back["model"]["b"], state["model"]["b"])
    assert int(back["optimizer"]["step"]) == 7


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-by-a-pickle",))


def test_a_planted_metadata_pickle_is_refused_without_running(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    monkeypatch.chdir(tmp_path)
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(
        StageError, match=r"\.metadata is not a checkpoint this stage wrote \((posix|os)\.system has no place"
    ):
        metadata_checked_reader(tmp_path / "ckpt").read_metadata()
    assert not (tmp_path / "planted-by-a-pickle").exists()
