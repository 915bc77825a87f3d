"""Files the data tests share."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels and whose data holds none.

    Written chunk by chunk (signature, IHDR, an empty IDAT, IEND), so the file stays under 100
    bytes whatever size it declares: the shape of a decompression bomb, without its payload.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path
