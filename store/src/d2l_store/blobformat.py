"""Deterministic safetensors encoding of adapter tensors, and decoding through the safetensors library.

Why our own encoder: `safetensors.torch.save` writes the `__metadata__` map in hash-map order, which
changes from process to process, so equal adapters would get different bytes and, since blobs are
named by the sha256 of their bytes, never deduplicate. The file format is tiny (8-byte little-endian
header length, a JSON header, the raw tensor bytes), so we write it with sorted keys and let the
reference library do all reading, which also keeps our files honest: whatever we write must load
in stock safetensors.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load

from d2l_store.errors import BlobIntegrityError

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
MAX_HEADER_BYTES = 16 * 1024 * 1024


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytearray:
    """Serialise `tensors` (name -> CPU tensor of a supported dtype) in name order.

    Same tensors and metadata give the same bytes in every process. Tensors are laid out back to
    back with no sharing, so views of one storage are fine here (the library's saver rejects them).
    """
    if sys.byteorder != "little":  # safetensors is little-endian; we copy raw memory.
        raise RuntimeError("the safetensors encoder needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)  # pad so the tensor data starts 8-byte aligned
    buf = bytearray(8 + len(head) + offset)
    buf[:8] = struct.pack("<Q", len(head))
    buf[8 : 8 + len(head)] = head
    pos = 8 + len(head)
    for name in sorted(tensors):
        raw = tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        buf[pos : pos + raw.size] = raw.data
        pos += raw.size
    return buf


def read_metadata(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The `__metadata__` map of a safetensors file, with the header bounds checked."""
    if len(data) < 8:
        raise BlobIntegrityError(f"blob is {len(data)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise BlobIntegrityError(f"safetensors header length {n} does not fit a {len(data)}-byte blob")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlobIntegrityError(f"safetensors header is not valid JSON: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BlobIntegrityError("safetensors header has no str -> str __metadata__ map")
    return meta


def decode(data: bytes | bytearray) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (tensors are fresh CPU copies)."""
    meta = read_metadata(data)
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # the library raises its own SafetensorError on malformed files
        raise BlobIntegrityError(f"safetensors data is malformed: {e}") from e
    return tensors, meta
