"""Tensor streams: safetensors-layout encode/decode, chunking, zero copy, malformed payload refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load

from fednode.errors import ProtocolError, Reason
from fednode.node.tensorstream import DTYPE_CODES, EncodedTensors, decode, encode

ALL_DTYPES = list(DTYPE_CODES)


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def joined(encoded: EncodedTensors, chunk_size: int, first_chunk: int = 0) -> bytearray:
    return bytearray(b"".join(bytes(c) for c in encoded.chunks(chunk_size, first_chunk)))


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def sample_tensors() -> dict[str, torch.Tensor]:
    tensors = {f"w.{DTYPE_CODES[d]}": make_tensor(d, (3, 5), seed=i) for i, d in enumerate(ALL_DTYPES)}
    tensors["empty"] = torch.empty((0, 4), dtype=torch.float32)
    tensors["empty1d"] = torch.empty(0, dtype=torch.int64)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["scalar_i64"] = torch.tensor(-(2**62), dtype=torch.int64)
    tensors["noncontig"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    return tensors


# -------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[DTYPE_CODES[d] for d in ALL_DTYPES])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (2, 0, 3), (3, 4, 5)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    t = make_tensor(dtype, shape, seed=len(shape))
    encoded = encode({"t": t})
    buf = joined(encoded, 1 << 20)
    assert len(buf) == encoded.total_size
    got, meta = decode(buf)
    assert meta == {}
    assert_same(got, {"t": t})


def test_extreme_values_survive_bit_exactly():
    f32 = torch.tensor([float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38], dtype=torch.float32)
    i64 = torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64)
    bf16 = torch.tensor([1e38, -1e-38, 0.0078125], dtype=torch.bfloat16)
    got, _ = decode(joined(encode({"f": f32, "i": i64, "b": bf16}), 7))
    assert_same(got, {"f": f32, "i": i64, "b": bf16})
    assert torch.signbit(got["f"][2])  # -0.0 keeps its sign
    nan = torch.tensor([float("nan")], dtype=torch.float16)
    got, _ = decode(joined(encode({"n": nan}), 3))
    assert torch.equal(got["n"].view(torch.int16), nan.view(torch.int16))


def test_round_trip_many_tensors_and_metadata():
    tensors = sample_tensors()
    encoded = encode(tensors, {"round": 7, "sender": "n1"})
    got, meta = decode(joined(encoded, 64))
    assert meta == {"round": "7", "sender": "n1"}  # metadata values become strings
    assert_same(got, tensors)


def test_empty_dict_round_trips():
    encoded = encode({})
    assert encoded.total_size == len(joined(encoded, 5))
    assert decode(joined(encoded, 5)) == ({}, {})


def test_unsupported_dtype_is_refused_at_encode():
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode({"c": torch.zeros(2, dtype=torch.complex64)})


def test_header_is_aligned_to_8_bytes():
    for names in (["a"], ["ab"], ["abc", "d"], ["x" * 13]):
        encoded = encode({n: torch.zeros(3, dtype=torch.uint8) for n in names})
        (header_len,) = struct.unpack("<Q", bytes(encoded.segments[0][:8]))
        assert header_len % 8 == 0 and len(encoded.segments[0]) == 8 + header_len


# ---------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 8, 13, 64, 100, 255, 4096, 10**6])
def test_chunking_at_many_sizes(chunk_size):
    tensors = sample_tensors()
    encoded = encode(tensors, {"k": "v"})
    reference = joined(encoded, 10**9)  # one chunk: the whole payload
    chunks = [bytes(c) for c in encoded.chunks(chunk_size)]
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_size
    assert len(chunks) == -(-encoded.total_size // chunk_size)
    buf = bytearray(b"".join(chunks))
    assert buf == reference and len(buf) == encoded.total_size
    got, _ = decode(buf)
    assert_same(got, tensors)


def test_chunk_larger_than_payload_is_one_chunk():
    encoded = encode({"a": torch.arange(5, dtype=torch.int32)})
    chunks = list(encoded.chunks(encoded.total_size * 10))
    assert len(chunks) == 1 and len(chunks[0]) == encoded.total_size


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 48, 333])
def test_resume_from_first_chunk(chunk_size):
    encoded = encode(sample_tensors())
    full = joined(encoded, chunk_size)
    count = -(-encoded.total_size // chunk_size)
    for first in sorted({0, 1, 2, count // 2, count - 1}):
        assert joined(encoded, chunk_size, first) == full[first * chunk_size:], first
        # the resumed chunks are the same pieces as the tail of a full stream
        assert [bytes(c) for c in encoded.chunks(chunk_size, first)] == \
            [bytes(c) for c in encoded.chunks(chunk_size)][first:]
    assert list(encoded.chunks(chunk_size, count)) == []  # past the end: nothing


def test_chunks_inside_a_tensor_are_views_of_it():
    t = torch.zeros(1024, dtype=torch.uint8)
    encoded = encode({"t": t})
    head = len(encoded.segments[0])
    assert head % 8 == 0
    chunks = list(encoded.chunks(8))
    inside = chunks[head // 8 + 3]  # bytes 24..31 of the tensor
    t[24:32] = 7  # the sender mutates its tensor after encoding: the view shows it (nothing was copied)
    assert bytes(inside) == b"\x07" * 8


# --------------------------------------------------------------------------------------- zero copy


def test_decoded_tensors_share_memory_with_the_buffer():
    tensors = {"a": torch.zeros(4, dtype=torch.float32), "b": torch.zeros((2, 2), dtype=torch.int16),
               "s": torch.tensor(0, dtype=torch.int64)}
    buf = joined(encode(tensors), 16)
    got, _ = decode(buf)
    (header_len,) = struct.unpack("<Q", buf[:8])
    data = 8 + header_len
    # tensors are laid out in name order: a (16 bytes), b (8 bytes), s (8 bytes)
    buf[data:data + 4] = struct.pack("<f", 1.5)
    buf[data + 16 + 6:data + 16 + 8] = struct.pack("<h", -3)
    buf[data + 24:data + 32] = struct.pack("<q", 2**40)
    assert got["a"][0].item() == 1.5
    assert got["b"][1, 1].item() == -3
    assert got["s"].item() == 2**40
    got["a"][3] = 9.0  # and writes through the tensor land in the buffer
    assert struct.unpack("<f", buf[data + 12:data + 16])[0] == 9.0


def test_decode_accepts_a_memoryview_and_stays_zero_copy():
    buf = joined(encode({"a": torch.ones(3, dtype=torch.float64)}), 1 << 10)
    got, _ = decode(memoryview(buf))
    buf[-8:] = struct.pack("<d", -4.0)
    assert got["a"].tolist() == [1.0, 1.0, -4.0]


# ------------------------------------------------------------------------------------- safetensors


def test_output_is_readable_by_safetensors():
    tensors = sample_tensors()
    raw = bytes(joined(encode(tensors, {"round": "3"}), 100))
    loaded = safetensors_load(raw)
    want = {k: v.contiguous() for k, v in tensors.items()}
    assert_same(loaded, want)


# -------------------------------------------------------------------------------------- malformed


def payload(header: object, data: bytes = b"", *, pad: bool = True) -> bytearray:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + data)


def refused(buf, reason: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(buf)
    assert info.value.reason == reason, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("n", [0, 1, 7])
def test_short_buffer_is_malformed(n):
    refused(bytearray(n), Reason.MALFORMED)


def test_header_length_beyond_the_payload_is_malformed():
    good = joined(encode({"a": torch.zeros(2)}), 64)
    (header_len,) = struct.unpack("<Q", good[:8])
    too_long = bytearray(struct.pack("<Q", len(good) - 8 + 1)) + good[8:]
    refused(too_long, Reason.MALFORMED)
    refused(bytearray(struct.pack("<Q", 2**63)) + good[8:], Reason.MALFORMED)
    refused(good[:8 + header_len - 1], Reason.MALFORMED)  # truncated inside the header


@pytest.mark.parametrize("header", [b"not json", b"\xff\xfe\x00garbage", b'{"a": ', b"", b"[1, 2, 3]",
                                    b'"just a string"', b'{"__metadata__": [1]}'])
def test_non_json_or_non_object_header_is_malformed(header):
    refused(payload(header, pad=False), Reason.MALFORMED)


@pytest.mark.parametrize("bad", [
    {"dtype": "F32", "shape": [2]},                                    # no offsets
    {"dtype": "F32", "data_offsets": [0, 8]},                          # no shape
    {"shape": [2], "data_offsets": [0, 8]},                            # no dtype
    {"dtype": "F32", "shape": [2], "data_offsets": [0]},               # one offset
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]},         # three offsets
    {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 8]},          # non-numeric dimension
    {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]},              # shape not a list
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},          # unhashable dtype
    "not an entry",
    17,
])
def test_malformed_header_entries_are_malformed(bad):
    refused(payload({"a": bad}, bytes(8)), Reason.MALFORMED)


@pytest.mark.parametrize("dtype", ["F8", "c64", "f32", "", "U16", "BF8"])
def test_unknown_dtype_is_malformed(dtype):
    refused(payload({"a": entry(dtype=dtype)}, bytes(8)), Reason.MALFORMED)


@pytest.mark.parametrize("offsets", [(0, 9), (4, 12), (-1, 7), (8, 4), (0, 2**64)])
def test_offsets_out_of_range_are_malformed(offsets):
    refused(payload({"a": entry(shape=(2,), offsets=offsets)}, bytes(8)), Reason.MALFORMED)


def test_negative_dimension_is_malformed():
    refused(payload({"a": entry(shape=(-2,), offsets=(0, 8))}, bytes(8)), Reason.MALFORMED)


def test_overlapping_tensors_are_malformed():
    header = {"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(4, 12))}
    error = refused(payload(header, bytes(16)), Reason.MALFORMED)
    assert "overlap" in str(error)
    same = {"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(0, 8))}
    refused(payload(same, bytes(8)), Reason.MALFORMED)
    nested = {"a": entry(shape=(4,), offsets=(0, 16)), "b": entry(dtype="U8", shape=(2,), offsets=(4, 6))}
    refused(payload(nested, bytes(16)), Reason.MALFORMED)
    by_one_byte = {"a": entry(dtype="U8", shape=(2,), offsets=(0, 2)),
                   "b": entry(dtype="U8", shape=(2,), offsets=(1, 3))}
    refused(payload(by_one_byte, bytes(3)), Reason.MALFORMED)


def test_adjacent_tensors_in_any_name_order_are_fine():
    header = {"z": entry(shape=(2,), offsets=(0, 8)), "a": entry(shape=(1,), offsets=(8, 12))}
    got, _ = decode(payload(header, struct.pack("<3f", 1.0, 2.0, 3.0)))
    assert got["z"].tolist() == [1.0, 2.0] and got["a"].tolist() == [3.0]


@pytest.mark.parametrize(("shape", "offsets"), [((3,), (0, 8)), ((2, 2), (0, 8)), ((1,), (0, 8)), ((), (0, 8)),
                                                ((0,), (0, 8)), ((2,), (0, 0))])
def test_shape_size_mismatch_is_shape_mismatch(shape, offsets):
    refused(payload({"a": entry(shape=shape, offsets=offsets)}, bytes(8)), Reason.SHAPE_MISMATCH)


def test_metadata_round_trips_and_is_not_a_tensor():
    got, meta = decode(payload({"__metadata__": {"a": "b"}, "t": entry(dtype="U8", shape=(1,), offsets=(0, 1))},
                               b"\x05"))
    assert meta == {"a": "b"} and list(got) == ["t"] and got["t"].item() == 5


@pytest.mark.parametrize("header", [
    b'{"a":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}',
])
def test_infinite_numbers_in_header_are_malformed(header):
    refused(payload(header, bytes(8)), Reason.MALFORMED)


def test_deeply_nested_header_is_malformed():
    refused(payload(b"[" * 100_000 + b"]" * 100_000), Reason.MALFORMED)


# ---------------------------------------------------------------------------------------- property

dtype_st = st.sampled_from(ALL_DTYPES)
shape_st = st.lists(st.integers(0, 4), max_size=3).map(tuple)
name_st = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8).filter(
    lambda s: s != "__metadata__")
tensors_st = st.dictionaries(name_st, st.tuples(dtype_st, shape_st, st.integers(0, 2**31 - 1)), max_size=6)


@settings(max_examples=100, deadline=None)
@given(spec=tensors_st, chunk_size=st.integers(1, 300), resume=st.integers(0, 50))
def test_property_random_tensors_round_trip_at_random_chunk_size(spec, chunk_size, resume):
    tensors = {name: make_tensor(d, shape, seed) for name, (d, shape, seed) in spec.items()}
    encoded = encode(tensors)
    chunks = [bytes(c) for c in encoded.chunks(chunk_size)]
    assert all(len(c) == chunk_size for c in chunks[:-1]) and len(chunks[-1]) <= chunk_size
    buf = bytearray(b"".join(chunks))
    assert len(buf) == encoded.total_size
    got, _ = decode(buf)
    assert_same(got, tensors)
    assert joined(encoded, chunk_size, resume) == buf[resume * chunk_size:]
