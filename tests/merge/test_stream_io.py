from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge._stream_io import (
    OutTensor,
    ShardWriter,
    iter_raw_chunks,
    read_header,
    read_tensor,
    shard_names,
    split_shards,
)

TENSORS = {
    "a": torch.randn(3, 5, dtype=torch.float32),
    "b": torch.randn(7, dtype=torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "d": torch.randn(4, 4).to(torch.float16),
    "e": torch.tensor([True, False, True]),
    "empty": torch.empty(0, 3),
}


def test_writer_output_is_read_by_safetensors_itself(tmp_path):
    path = tmp_path / "x.safetensors"
    declared = [OutTensor(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]
    writer = ShardWriter(path, declared)
    for name, tensor in TENSORS.items():
        if name == "a":  # one tensor through the raw-bytes path
            writer.write_raw(name, iter([tensor.numpy().tobytes()]))
        else:
            writer.write_tensor(name, tensor)
    writer.close()
    with safe_open(str(path), "pt") as handle:
        assert set(handle.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    assert sum(t.nbytes for t in declared) == sum(v.numel() * v.element_size() for v in TENSORS.values())


def test_reader_matches_safetensors_and_copies_raw_bytes(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(TENSORS, str(path))
    entries, metadata = read_header(path)
    assert {e.name for e in entries} == set(TENSORS)
    for entry in entries:
        assert torch.equal(read_tensor(entry), TENSORS[entry.name])
        raw = TENSORS[entry.name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert b"".join(iter_raw_chunks(entry, chunk=4)) == raw


def test_truncated_and_garbage_files_are_bad_input(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(BadInputError, match="truncated"):
        read_header(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BadInputError, match="not a valid safetensors"):
        read_header(path)


def test_writer_refuses_out_of_order_or_wrong_shape(tmp_path):
    declared = [OutTensor("a", torch.float32, (2,)), OutTensor("b", torch.float32, (2,))]
    writer = ShardWriter(tmp_path / "w.safetensors", declared)
    with pytest.raises(RuntimeError, match="order"):
        writer.write_tensor("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="declared"):
        writer.write_tensor("a", torch.zeros(3))
    writer.abort()


def test_shards_split_like_transformers():
    tensors = [OutTensor(str(i), torch.float32, (10,)) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in split_shards(tensors, 100)] == [2, 2, 1]
    assert [len(s) for s in split_shards(tensors, 10)] == [1, 1, 1, 1, 1]  # bigger than the limit: alone
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3)[1] == "model-00002-of-00003.safetensors"
