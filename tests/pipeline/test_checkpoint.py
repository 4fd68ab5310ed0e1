"""Tensor-by-tensor checkpoint reading and writing agree with the safetensors library."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import INDEX, CheckpointReader, SafetensorsWriter


def test_what_the_writer_writes_the_library_reads_bit_for_bit(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(10, dtype=torch.uint8),
        "d": torch.randn(2, 2).half(),
        "e": torch.zeros(0),
    }
    with SafetensorsWriter(tmp_path / "x.safetensors") as w:
        for k, v in tensors.items():
            w.add(k, v if k != "c" else v.numpy())
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch file left


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "x.safetensors") as w:
            w.add("a", np.ones(3, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_the_reader_reads_sharded_and_single_checkpoints_as_the_library_does(tmp_path):
    shards = {
        "model-1.safetensors": {"x": torch.randn(4, 4), "y": torch.randn(3).to(torch.bfloat16)},
        "model-2.safetensors": {"z": torch.arange(6, dtype=torch.int64).reshape(2, 3)},
    }
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {k: n for n, t in shards.items() for k in t}}))
    reader = CheckpointReader(tmp_path)
    assert sorted(reader) == ["x", "y", "z"] and "x" in reader and "w" not in reader
    for tensors in shards.values():
        for k, v in tensors.items():
            assert reader[k].dtype == v.dtype and torch.equal(reader[k], v)


def test_a_sharded_checkpoint_is_indexed_and_reads_back(tmp_path):
    import json

    import numpy as np

    from pipeline.checkpoint import INDEX, CheckpointReader, ShardedWriter

    arrays = {f"t{i}": np.full((100,), i, np.float32) for i in range(5)}
    with ShardedWriter(tmp_path / "many", shard_bytes=900) as w:  # two tensors (800 bytes) per shard
        (tmp_path / "many").mkdir()
        for name, array in arrays.items():
            w.add(name, array)
    index = json.loads((tmp_path / "many" / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reader = CheckpointReader(tmp_path / "many")
    assert all(np.array_equal(reader[n].numpy(), a) for n, a in arrays.items())
    (tmp_path / "one").mkdir()
    with ShardedWriter(tmp_path / "one") as w:
        w.add("t0", arrays["t0"])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
