"""Minimal protobuf wire-format reader/writer for TenSEAL's ``TenSEALContextProto``.

TenSEAL serializes contexts as protobuf (``tenseal/proto/tensealcontext.proto``) but ships no
Python bindings for it; the few fields the keysets need are read and written here by hand.
Only wire types 0 (varint), 1 (64-bit) and 2 (length-delimited) occur in those messages.
"""

from __future__ import annotations

import struct

# TenSEALContextProto field numbers (tensealcontext.proto).
CTX_ENCRYPTION_PARAMETERS = 1
CTX_PUBLIC = 2
CTX_PRIVATE = 3
CTX_ENCRYPTION_TYPE = 4
PUB_PUBLIC_KEY = 1
PUB_AUTO_FLAGS = 2
PUB_SCALE = 3
PRIV_SECRET_KEY = 1
ENCRYPTION_TYPE_ASYMMETRIC = 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, data: bytes) -> bytes:
    """Encode a length-delimited field."""
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def field_varint(number: int, value: int) -> bytes:
    """Encode a varint field."""
    return _varint(number << 3) + _varint(value)


def field_double(number: int, value: float) -> bytes:
    """Encode a 64-bit double field."""
    return _varint((number << 3) | 1) + struct.pack("<d", value)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def parse_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Top-level fields of a protobuf message: number -> values in order of appearance.

    Raises
    ------
    ValueError
        If the bytes are not a well-formed message with the supported wire types.
    """
    fields: dict[int, list[bytes | int]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            if pos + 8 > len(data):
                raise ValueError("truncated 64-bit field")
            value = data[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            value = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if number == 0:
            raise ValueError("protobuf field number 0")
        fields.setdefault(number, []).append(value)
    return fields
