"""Tensors <-> a byte stream in the safetensors layout, without whole-payload copies.

The sender yields fixed-size chunks that are zero-copy views of the tensors wherever a chunk
lies inside one tensor; the receiver fills one preallocated buffer and maps tensors onto it
with `torch.frombuffer`. So each side holds the payload plus a bounded number of chunks, and
the bytes stay readable by any safetensors implementation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fednode.errors import ProtocolError, Reason

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_HEADER = 64 * 1024 * 1024


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer


@dataclass
class EncodedTensors:
    """A payload ready to stream: the header plus views of each tensor's bytes."""

    segments: list[memoryview]
    total_size: int

    def chunks(self, chunk_size: int, first_chunk: int = 0) -> Iterator[memoryview]:
        """Yield consecutive `chunk_size` pieces (the last may be shorter), starting at a chunk index."""
        offset = first_chunk * chunk_size
        seg_index, seg_offset = 0, offset
        while seg_index < len(self.segments) and seg_offset >= len(self.segments[seg_index]):
            seg_offset -= len(self.segments[seg_index])
            seg_index += 1
        emitted_any = False
        while seg_index < len(self.segments):
            seg = self.segments[seg_index]
            if seg_offset + chunk_size <= len(seg):  # fast path: a view inside one segment
                yield seg[seg_offset:seg_offset + chunk_size]
                seg_offset += chunk_size
                emitted_any = True
                if seg_offset == len(seg):
                    seg_index, seg_offset = seg_index + 1, 0
                continue
            piece = bytearray()
            while seg_index < len(self.segments) and len(piece) < chunk_size:
                seg = self.segments[seg_index]
                take = min(chunk_size - len(piece), len(seg) - seg_offset)
                piece += seg[seg_offset:seg_offset + take]
                seg_offset += take
                if seg_offset == len(seg):
                    seg_index, seg_offset = seg_index + 1, 0
            if piece:
                yield memoryview(piece)
                emitted_any = True
        if not emitted_any and first_chunk == 0:
            yield memoryview(b"")


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> EncodedTensors:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    views = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name} has unsupported dtype {t.dtype}")
        view = _tensor_bytes(t)
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(view)]}
        offset += len(view)
        views.append(view)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    head = memoryview(struct.pack("<Q", len(raw)) + raw)
    return EncodedTensors([head, *views], len(head) + offset)


def decode(buffer: bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map tensors onto `buffer` (zero copy); every malformed layout is a MALFORMED refusal."""
    view = memoryview(buffer)
    if len(view) < 8:
        raise ProtocolError(Reason.MALFORMED, f"payload of {len(view)} bytes is shorter than a header")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > min(MAX_HEADER, len(view) - 8):
        raise ProtocolError(Reason.MALFORMED, f"payload header length {header_len} exceeds the payload")
    try:
        header = json.loads(bytes(view[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(Reason.MALFORMED, f"payload header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Reason.MALFORMED, "payload header is not an object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise ProtocolError(Reason.MALFORMED, "payload metadata is not an object")
    data_start = 8 + header_len
    data_len = len(view) - data_start
    tensors: dict[str, torch.Tensor] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = CODE_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ProtocolError(Reason.MALFORMED, f"tensor {name!r} has a malformed header entry") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len:
            raise ProtocolError(Reason.MALFORMED, f"tensor {name!r} lies outside the payload")
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count * itemsize != end - begin:
            raise ProtocolError(Reason.SHAPE_MISMATCH,
                                f"tensor {name!r}: shape {shape} does not fit {end - begin} bytes")
        spans.append((begin, end, name))
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=count,
                                             offset=data_start + begin).reshape(shape)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise ProtocolError(Reason.MALFORMED, f"tensors {a!r} and {b!r} overlap in the payload")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
