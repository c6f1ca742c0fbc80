"""Reed-Solomon erasure coding over GF(2^8), with the encoding matrix klauspost/reedsolomon (kcp-go's codec)
builds by default, so that parity bytes are identical to theirs.

The field: bytes as polynomials over GF(2) modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator 2.

The matrix for ``d`` data and ``p`` parity shards: start from the (d+p) x d Vandermonde matrix whose entry at
row ``r``, column ``c`` is ``r`` to the power ``c`` (with 0^0 = 1), then multiply it on the right by the inverse
of its top d x d square. The top square becomes the identity (data shards travel unchanged) and the bottom
``p`` rows are the parity coefficients; any ``d`` rows of the result still form an invertible matrix, so any
``d`` surviving shards give back the data.

Shards are bytes of one common length. Multiplying a shard by a constant is one ``bytes.translate`` with that
constant's 256-byte product table, and adding shards is an XOR of the shards read as big integers: both run at
C speed, which keeps a 10/3 group of 1350-byte datagrams in the tens of microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Final

__all__ = ["MAX_SHARDS", "FECError", "ReedSolomon", "gf_mul"]


class FECError(ValueError):
    """Shard counts or shards the code cannot take, or a malformed FEC packet (:mod:`vtunnel.arq.fec`)."""


_POLYNOMIAL: Final = 0x11D
#: data + parity shards cannot pass the field size
MAX_SHARDS: Final = 256


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 510
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _POLYNOMIAL
    for i in range(255, 510):
        exp[i] = exp[i - 255]
    return exp, log


_EXP, _LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _gf_inv(a: int) -> int:
    return _EXP[255 - _LOG[a]]


def _gf_pow(a: int, n: int) -> int:
    if n == 0:
        return 1
    if a == 0:
        return 0
    return _EXP[(_LOG[a] * n) % 255]


@cache
def _product_table(c: int) -> bytes:
    """``x -> c * x`` for every byte ``x``, as a ``bytes.translate`` table."""
    return bytes(gf_mul(c, x) for x in range(256))


Matrix = list[list[int]]


def _multiply(a: Matrix, b: Matrix) -> Matrix:
    out: Matrix = []
    for row in a:
        result = [0] * len(b[0])
        for k, factor in enumerate(row):
            if factor:
                for j, value in enumerate(b[k]):
                    result[j] ^= gf_mul(factor, value)
        out.append(result)
    return out


def _invert(m: Matrix) -> Matrix:
    """Gauss-Jordan elimination; :class:`FECError` for a singular matrix (never for the rows we pick)."""
    size = len(m)
    work = [row[:] + [1 if i == j else 0 for j in range(size)] for i, row in enumerate(m)]
    for col in range(size):
        pivot = next((r for r in range(col, size) if work[r][col]), None)
        if pivot is None:
            raise FECError("singular matrix")
        work[col], work[pivot] = work[pivot], work[col]
        scale = _gf_inv(work[col][col])
        work[col] = [gf_mul(scale, v) for v in work[col]]
        for r in range(size):
            factor = work[r][col]
            if r != col and factor:
                pivot_row = work[col]
                work[r] = [v ^ gf_mul(factor, p) for v, p in zip(work[r], pivot_row, strict=True)]
    return [row[size:] for row in work]


@cache
def _encoding_matrix(data_shards: int, total_shards: int) -> tuple[tuple[int, ...], ...]:
    vandermonde = [[_gf_pow(r, c) for c in range(data_shards)] for r in range(total_shards)]
    top_inverse = _invert([row[:] for row in vandermonde[:data_shards]])
    return tuple(tuple(row) for row in _multiply(vandermonde, top_inverse))


@lru_cache(maxsize=1024)
def _decoding_matrix(data_shards: int, total_shards: int, rows: tuple[int, ...]) -> Matrix:
    """The inverse of the encoding matrix's ``rows``: the data shards from the shards of those rows (one per
    pattern of losses, kept: a lossy path repeats its patterns)."""
    matrix = _encoding_matrix(data_shards, total_shards)
    return _invert([list(matrix[i]) for i in rows])


def _combine(coefficients: Sequence[int], shards: Sequence[bytes], size: int) -> bytes:
    """The sum of ``coefficients[i] * shards[i]``, ``size`` bytes long."""
    return _apply([_product_table(c) if c > 1 else c for c in coefficients], shards, size)


def _apply(tables: Sequence[bytes | int], shards: Sequence[bytes], size: int) -> bytes:
    """The sum of the shards, each multiplied through its product table (0: left out, 1: as it is)."""
    total = 0
    for table, shard in zip(tables, shards, strict=True):
        if isinstance(table, bytes):
            total ^= int.from_bytes(shard.translate(table), "big")
        elif table:
            total ^= int.from_bytes(shard, "big")
    return total.to_bytes(size, "big")


class ReedSolomon:
    """A ``data_shards`` + ``parity_shards`` code (both at least 1, together at most 256)."""

    __slots__ = ("_matrix", "_parity_tables", "data_shards", "parity_shards")

    def __init__(self, data_shards: int, parity_shards: int) -> None:
        if data_shards < 1 or parity_shards < 1 or data_shards + parity_shards > MAX_SHARDS:
            raise FECError(f"invalid shard counts {data_shards}/{parity_shards}")
        self.data_shards = data_shards
        self.parity_shards = parity_shards
        self._matrix = _encoding_matrix(data_shards, data_shards + parity_shards)
        #: each parity row's product tables (0 and 1 as they are), looked up once
        self._parity_tables = [
            [_product_table(c) if c > 1 else c for c in row] for row in self._matrix[data_shards:]
        ]

    @property
    def matrix(self) -> tuple[tuple[int, ...], ...]:
        """The whole (data + parity) x data encoding matrix."""
        return self._matrix

    def encode(self, data: Sequence[bytes]) -> list[bytes]:
        """The parity shards of ``data`` (``data_shards`` shards of one length)."""
        if len(data) != self.data_shards:
            raise FECError(f"{len(data)} data shards given, {self.data_shards} expected")
        size = len(data[0])
        if any(len(shard) != size for shard in data):
            raise FECError("data shards differ in length")
        return [_apply(tables, data, size) for tables in self._parity_tables]

    def reconstruct_data(self, shards: Sequence[bytes | None]) -> list[bytes]:
        """The data shards, given every shard of the group or ``None`` where it is missing.

        The present shards must share one length; at least ``data_shards`` of them must be present.
        """
        total = self.data_shards + self.parity_shards
        if len(shards) != total:
            raise FECError(f"{len(shards)} shards given, {total} expected")
        present = [i for i, shard in enumerate(shards) if shard is not None]
        if len(present) < self.data_shards:
            raise FECError(f"only {len(present)} shards of {total} present, {self.data_shards} needed")
        sizes = {len(shards[i] or b"") for i in present}
        if len(sizes) != 1:
            raise FECError("shards differ in length")
        size = sizes.pop()
        data: list[bytes | None] = list(shards[: self.data_shards])
        if all(shard is not None for shard in data):
            return [shard for shard in data if shard is not None]
        rows = tuple(present[: self.data_shards])
        decode = _decoding_matrix(self.data_shards, total, rows)
        inputs = [shards[i] or b"" for i in rows]
        return [
            shard if shard is not None else _combine(decode[index], inputs, size)
            for index, shard in enumerate(data)
        ]
