"""Decoding one hypothesis-drawn byte string into a fuzzed file, shared by the fuzz tests of our
run directory (test_rundir_fuzz.py) and of foreign formats (test_foreign_fuzz.py)."""
from __future__ import annotations


def decode(blob: bytes, templates: list[bytes]) -> bytes:
    """One example's file from one drawn byte string.

    Byte 0: bit 0 set -> the rest is the file (random bytes). Otherwise bits 1-2 pick a template,
    bits 3-5 a number of mutations (0-7) and bit 6 a final cut; each mutation is 5 more bytes
    (kind: replace / insert / delete, a 3-byte position, a value), then 3 bytes of cut position.
    All zero bytes (what hypothesis shrinks to) is the unmodified first template.
    """
    if not blob:
        return templates[0]
    head, rest = blob[0], blob[1:]
    if head & 1:
        return rest
    b = bytearray(templates[(head >> 1 & 3) % len(templates)])
    k = 0
    for _ in range(head >> 3 & 7):
        op = rest[k:k + 5]
        if len(op) < 5:
            break
        k += 5
        if not b:
            b.append(op[4])
            continue
        i = int.from_bytes(op[1:4], "little") % len(b)
        kind = op[0] % 3
        if kind == 0:
            b[i] = op[4]
        elif kind == 1:
            b.insert(i, op[4])
        else:
            del b[i]
    if head & 64 and b:
        b = b[: int.from_bytes(rest[k:k + 3].ljust(3, b"\0"), "little") % (len(b) + 1)]
    return bytes(b)
