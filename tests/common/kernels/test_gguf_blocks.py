"""GGUF blocks -> RowWeight (common/kernels/gguf_blocks.py): every supported type decodes to codes,
scales and offsets whose float32 ``s * u + z`` is bit-identical to ``gguf.quants.dequantize``; and
the fast header index agrees with ``gguf.GGUFReader``."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from common import model_catalog
from common.kernels import gguf_blocks
from common.kernels.gguf_blocks import SUPPORTED, decode, decode_rows, read_index, row_bytes
from common.kernels.packing import BlockScales

T = gguf.GGMLQuantizationType
# byte offsets of each block's fp16 fields (the rest of a block is any bytes at all)
FP16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q8_0: (0,), T.Q4_K: (0, 2)}
FP16_FIELDS[T.Q6_K] = (208,)
BLOCK_OFFSET = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 128}
GROUP_BITS = {T.Q4_0: (32, 4), T.Q4_1: (32, 4), T.Q4_K: (32, 4)}
GROUP_BITS |= {T.Q5_0: (32, 5), T.Q6_K: (16, 6), T.Q8_0: (32, 8)}
MAX_CODE = {T.Q4_0: 15, T.Q4_1: 15, T.Q4_K: 15, T.Q5_0: 31, T.Q6_K: 63, T.Q8_0: 255}


def random_blocks(qtype: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """``[n, row bytes]`` of random blocks with sane fp16 fields (zero, subnormal, either sign)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        d = (rng.standard_normal((n, k // block)) * 0.02).astype(np.float16)
        d.flat[:4] = [0.0, 6e-8, -3e-6, 1.0]  # zero, subnormals, one
        blocks[..., at : at + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return blocks.reshape(n, -1)


def assert_exact(data: np.ndarray, qtype: T, n: int, k: int) -> gguf_blocks.RowWeight:
    weight = decode(data, qtype, n, k)
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(n, k))
    assert (weight.group, weight.bits) == GROUP_BITS[qtype]
    assert int(weight.u.max()) <= MAX_CODE[qtype]
    assert torch.equal(weight.dequantize(), expected)
    assert weight.factors is not None, "d or dm not a float16"
    if qtype in BLOCK_OFFSET:  # one float16 scale per group, the codes offset by a constant
        assert isinstance(weight.factors, BlockScales)
        assert weight.factors.offset == BLOCK_OFFSET[qtype]
    else:
        assert weight.factors.superblock == gguf.GGML_QUANT_SIZES[qtype][0]
    s, z = weight.factors.scales()  # the file's factors give s and z to the bit (zero's sign too)
    assert torch.equal(s.view(torch.int32), weight.s.view(torch.int32))
    assert torch.equal(z.view(torch.int32), weight.z.view(torch.int32))
    return weight


def test_factors_fall_back_where_a_product_overflows_float16():
    """Q6_K's dm = -32 d is no float16 for |d| > 2047: that tensor keeps float32 s and z. Block
    scales keep d alone (z = -128 d in float32), so a Q8_0 d of 1000 keeps them."""
    data = random_blocks(T.Q6_K, 16, 256)  # one block per row
    data[0, 208:210] = np.frombuffer(np.float16(4000.0).tobytes(), dtype=np.uint8)
    weight = decode(data, T.Q6_K, 16, 256)
    assert weight.factors is None
    expected = gguf.quants.dequantize(data, T.Q6_K).reshape(16, 256)
    assert torch.equal(weight.dequantize(), torch.from_numpy(expected))
    data = random_blocks(T.Q8_0, 16, 64)
    data[0, :2] = np.frombuffer(np.float16(1000.0).tobytes(), dtype=np.uint8)
    assert float(assert_exact(data, T.Q8_0, 16, 64).z[0, 0]) == -128_000.0


@pytest.mark.parametrize("qtype", sorted(SUPPORTED), ids=lambda t: t.name)
def test_random_blocks_decode_exactly(qtype):
    n, k = 48, 512
    weight = assert_exact(random_blocks(qtype, n, k), qtype, n, k)
    assert weight.u.shape == (n, k) and weight.s.shape == (n, k // weight.group)
    assert int(weight.u.max()) == MAX_CODE[qtype]  # random bytes reach every code


def test_q4_0_from_gguf_quantizer():
    x = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
    data = gguf.quants.quantize(x, T.Q4_0)
    weight = assert_exact(data, T.Q4_0, 32, 256)
    assert torch.allclose(weight.dequantize(), torch.from_numpy(x), atol=0.5)


def test_flat_bytes_and_chunked_rows(monkeypatch):
    data = random_blocks(T.Q6_K, 40, 256, seed=2)
    monkeypatch.setattr(gguf_blocks, "CHUNK_ELEMENTS", 256 * 3)  # 3 rows a step, a ragged end
    assert_exact(data.reshape(-1), T.Q6_K, 40, 256)


def test_unsupported_types_and_bad_shapes():
    data = np.zeros((16, 66), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"blk.0.x: GGUF tensor type Q2_K .*`hf` backend"):
        decode(data, T.Q2_K, 16, 256, name="blk.0.x")
    with pytest.raises(ValueError, match="type F32 is not supported"):
        decode(np.zeros((16, 64), np.uint8).view(np.float32), T.F32, 16, 16)
    with pytest.raises(ValueError, match="not 16 rows of 288 Q8_0"):
        decode(data, T.Q8_0, 16, 288)
    with pytest.raises(ValueError, match="whole number of Q4_K blocks"):
        decode(data, T.Q4_K, 16, 128)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q8_0], ids=lambda t: t.name)
def test_decode_rows_matches_the_whole_table(qtype):
    n, k = 64, 256
    data = random_blocks(qtype, n, k, seed=3)
    rows = [5, 0, 63, 5]
    table = decode(data, qtype, n, k).dequantize()
    assert torch.equal(decode_rows(data, qtype, k, rows), table[rows])
    assert torch.equal(decode_rows(data, qtype, k, torch.tensor(rows)), table[rows])
    assert decode_rows(data, qtype, k, []).shape == (0, k)
    with pytest.raises(IndexError):
        decode_rows(data, qtype, k, [n])


def test_decode_rows_of_float_tables():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert decode_rows(table, T.F32, 3, [2]).tolist() == [[6.0, 7.0, 8.0]]
    halves = table.astype(np.float16)
    assert decode_rows(halves, T.F16, 3, [1, 0]).tolist() == [[3, 4, 5], [0, 1, 2]]
    with pytest.raises(ValueError, match="IQ4_NL"):
        decode_rows(np.zeros((1, 18), np.uint8), T.IQ4_NL, 32, [0])


def assert_index_matches_reader(path) -> None:
    index, reader = read_index(path), gguf.GGUFReader(path)
    assert list(index.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = index.tensors[t.name]
        assert (info.qtype, info.shape) == (t.tensor_type, tuple(int(d) for d in t.shape))
        assert (info.offset, info.n_bytes) == (t.data_offset, t.n_bytes)
        assert np.array_equal(index.data(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == 8:  # strings
            assert key not in index.metadata
        else:
            assert np.array_equal(np.asarray(index.metadata[key]), np.asarray(field.contents()))


def test_read_index_of_a_written_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_token_list(["a", "bé", "<|end|>"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    writer.add_string("general.name", "tiny")
    weight = random_blocks(T.Q4_K, 16, 256)
    writer.add_tensor("w", weight, raw_dtype=T.Q4_K)  # shape from the bytes: [16, 256]
    writer.add_tensor("norm", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_index_matches_reader(path)
    index = read_index(path)
    assert (
        index.metadata["general.name"] == "tiny" and "tokenizer.ggml.tokens" not in index.metadata
    )
    assert index.tensors["w"].shape == (256, 16)
    assert torch.equal(
        decode(index.data("w"), T.Q4_K, 16, 256).u, decode(weight, T.Q4_K, 16, 256).u
    )
    (tmp_path / "x.gguf").write_bytes(b"GGML" * 8)
    with pytest.raises(ValueError, match="not a GGUF"):
        read_index(tmp_path / "x.gguf")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        read_index(path)


MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
ROW_LIMIT = 2048  # of the 151936-row tables, check a slice


@pytest.fixture(scope="module", params=MODELS)
def index(request) -> gguf_blocks.GGUFIndex:
    path = model_catalog.gguf_path(request.param)
    if not path.is_file():
        group = model_catalog.group_for(request.param)
        pytest.skip(f"{path} missing: run `{model_catalog.PREPARE_COMMAND} {group}`")
    return read_index(path)


def table(index: gguf_blocks.GGUFIndex, name: str) -> tuple[np.ndarray, T, int, int]:
    """``(bytes [n, row bytes], type, n, k)`` of a matrix."""
    info = index.tensors[name]
    k, n = info.shape
    return index.data(name).reshape(n, row_bytes(info.qtype, k)), info.qtype, n, k


@pytest.mark.models
def test_real_tensors_decode_exactly(index):
    """Up to three tensors of each quantized type in the file, and its two big tables."""
    picked: dict[T, int] = {}
    for name, info in index.tensors.items():
        if info.qtype == T.F32:
            continue
        assert info.qtype in SUPPORTED, f"{name}: {info.qtype.name}"
        big = name in ("token_embd.weight", "output.weight")
        if picked.get(info.qtype, 0) >= 3 and not big:
            continue
        picked[info.qtype] = picked.get(info.qtype, 0) + 1
        data, qtype, n, k = table(index, name)
        first = max(0, n - ROW_LIMIT)  # the end of the big tables: odd rows too
        assert_exact(np.ascontiguousarray(data[first:]), qtype, n - first, k)
    assert picked


@pytest.mark.models
def test_real_embedding_rows(index):
    data, qtype, n, k = table(index, "token_embd.weight")
    rows = [0, 1, n // 2, n - 1]
    expected = gguf.quants.dequantize(data[rows], qtype).reshape(len(rows), k)
    got = decode_rows(data, qtype, k, rows)
    assert torch.equal(got, torch.from_numpy(expected))
    assert got.abs().sum(dim=1).min() > 0


@pytest.mark.models
def test_read_index_of_smollm2():
    path = model_catalog.gguf_path("smollm2-135m")
    if not path.is_file():
        pytest.skip(f"{path} missing: run `{model_catalog.PREPARE_COMMAND} smollm2`")
    assert_index_matches_reader(path)
