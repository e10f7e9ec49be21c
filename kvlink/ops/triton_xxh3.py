"""Triton kernels for xxh3-64 of segments in device memory; must match :func:`xxhash.xxh3_64_intdigest`
(:func:`kvlink.ops.reference.xxh3_segments`) bit for bit.

Why this works in parallel although xxh3 runs block after block: for an input of more than 240
bytes xxh3 keeps eight 64-bit accumulators, and within one 1 KiB block every 64-byte stripe only
*adds* to them. So the block's contribution (the wrapping sum over its 16 stripes) can be computed
for every block at once (:func:`_block_sums_kernel`, which reads all the data); what is left serial
is ``acc = scramble(acc + contribution)`` per block and lane, over 1/128 of the data's size
(:func:`_finish_kernel`, which then adds the last partial block and the last stripe, merges the
accumulators and avalanches: the digest).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
Launchers with input checks: :mod:`kvlink.ops.digest`.
"""

from __future__ import annotations

import struct

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

# xxh3's default secret (XXH3_kSecret in csrc/third_party/xxhash/xxhash.h).
SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
PRIME32_1, PRIME32_2, PRIME32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
PRIME64 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
PRIME_MX1 = 0x165667919E3779F9
MIN_LEN = 241  # shorter inputs take xxh3's short paths: hashed on the host
BLOCK = 1024  # bytes per block: 16 stripes of 64
ROWS = 8  # blocks per program step of the block-sum kernel
SEARCH = 18  # binary-search steps from a row to its segment: enough for 2**17 segments


def _le64(offset: int) -> int:
    return int.from_bytes(SECRET[offset:offset + 8], "little")


def _constants() -> list[int]:
    """The 64 words the kernels read, as int64 bit patterns: secret words 0..23 (aligned: stripe
    ``s`` lane ``l`` uses word ``s + l``; the scrambler words 16..23), initial accumulators at 24,
    last-stripe key (secret + 121) at 32, merge key (secret + 11) at 40, then PRIME32_1,
    PRIME64_1, PRIME_MX1 at 48..50."""
    words = [_le64(8 * i) for i in range(24)]
    words += [PRIME32_3, PRIME64[0], PRIME64[1], PRIME64[2], PRIME64[3], PRIME32_2, PRIME64[4], PRIME32_1]
    words += [_le64(121 + 8 * i) for i in range(8)]
    words += [_le64(11 + 8 * i) for i in range(8)]
    words += [PRIME32_1, PRIME64[0], PRIME_MX1]
    words += [0] * (64 - len(words))
    return list(struct.unpack("<64q", struct.pack("<64Q", *words)))


CONSTANTS = _constants()


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _u64(x):
        return x.to(tl.uint64, bitcast=True)

    @triton.jit
    def _mul_fold(dk):
        # xxh3's XXH_mult32to64 of the key-mixed word's halves
        return dk.to(tl.uint32).to(tl.uint64) * (dk >> 32)

    @triton.jit
    def _block_sums_kernel(words, consts, seg_byte, seg_len, seg_row, sums, num_segments, num_rows,
                           ROWS: tl.constexpr, SEARCH: tl.constexpr):
        """sums[row] for ``ROWS`` rows: the wrapping sum of the stripe contributions of one block
        (segment ``s`` owns rows ``seg_row[s]`` .. its ``nb`` full blocks and the last, partial
        one: the stripes before its last byte)."""
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row = tl.minimum(row, num_rows - 1)  # the tail program repeats the last row
        # which segment owns each row: the last s with seg_row[s] <= row (seg_row[0] is 0)
        lo = tl.zeros([ROWS], tl.int64)
        hi = lo + num_segments
        for _ in tl.static_range(SEARCH):
            mid = (lo + hi) // 2
            below = tl.load(seg_row + mid) <= row
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        n = tl.load(seg_len + lo)
        nb = (n - 1) // 1024
        block = row - tl.load(seg_row + lo)
        stripes = tl.where(block < nb, 16, ((n - 1) - nb * 1024) // 64)[:, None, None]
        st = tl.arange(0, 16)[None, :, None]
        lane = tl.arange(0, 8)[None, None, :]
        valid = (st < stripes) & (lane < 8)
        at = (tl.load(seg_byte + lo) // 8 + block * 128)[:, None, None] + st * 8
        data = _u64(tl.load(words + at + lane, mask=valid, other=0))
        swapped = _u64(tl.load(words + at + (lane ^ 1), mask=valid, other=0))
        key = _u64(tl.load(consts + st + lane))
        total = tl.sum(tl.where(valid, swapped + _mul_fold(data ^ key), 0), axis=1)
        lane2 = tl.arange(0, 8)[None, :]
        tl.store(sums + row[:, None] * 8 + lane2, total.to(tl.int64, bitcast=True))

    @triton.jit
    def _stripe_word(data, at, lane):
        # little-endian 64-bit word ``lane`` of the 64 bytes at ``at``, from byte loads (``at``
        # need not be aligned)
        j = tl.arange(0, 8)[None, :]
        b = tl.load(data + at + lane[:, None] * 8 + j).to(tl.uint64)
        return tl.sum(b << (j * 8).to(tl.uint64), axis=1)

    @triton.jit
    def _mul128_fold64(a, b):
        # low ^ high half of the 128-bit product, from 32-bit halves (xxh3's portable fallback)
        a_lo = a.to(tl.uint32).to(tl.uint64)
        a_hi = a >> 32
        b_lo = b.to(tl.uint32).to(tl.uint64)
        b_hi = b >> 32
        lo_lo = a_lo * b_lo
        hi_lo = a_hi * b_lo
        lo_hi = a_lo * b_hi
        hi_hi = a_hi * b_hi
        cross = (lo_lo >> 32) + hi_lo.to(tl.uint32).to(tl.uint64) + lo_hi
        upper = (hi_lo >> 32) + (cross >> 32) + hi_hi
        lower = (cross << 32) | lo_lo.to(tl.uint32).to(tl.uint64)
        return lower ^ upper

    @triton.jit
    def _finish_kernel(data, consts, seg_byte, seg_len, seg_row, sums, out, UNROLL: tl.constexpr):
        """out[s] = xxh3-64 of segment ``s`` from its block sums and its last 64 bytes."""
        s = tl.program_id(0)
        lane = tl.arange(0, 8)
        n = tl.load(seg_len + s)
        nb = (n - 1) // 1024
        row0 = tl.load(seg_row + s)
        acc = _u64(tl.load(consts + 24 + lane))
        scramble_key = _u64(tl.load(consts + 16 + lane))
        prime32 = _u64(tl.load(consts + 48))
        # The serial part: per block, add its sum and scramble (loads do not depend on acc, so
        # the unrolled loop issues them ahead).
        for b in tl.range(0, nb, loop_unroll_factor=UNROLL):
            a = acc + _u64(tl.load(sums + (row0 + b) * 8 + lane))
            acc = (a ^ (a >> 47) ^ scramble_key) * prime32
        acc = acc + _u64(tl.load(sums + (row0 + nb) * 8 + lane))
        at = tl.load(seg_byte + s) + n - 64  # the last stripe
        word = _stripe_word(data, at, lane)
        swapped = _stripe_word(data, at, lane ^ 1)
        acc = acc + swapped + _mul_fold(word ^ _u64(tl.load(consts + 32 + lane)))
        x = acc ^ _u64(tl.load(consts + 40 + lane))
        even, odd = tl.split(tl.reshape(x, [4, 2]))
        h = n.to(tl.uint64) * _u64(tl.load(consts + 49)) + tl.sum(_mul128_fold64(even, odd), axis=0)
        h = h ^ (h >> 37)
        h = h * _u64(tl.load(consts + 50))
        h = h ^ (h >> 32)
        tl.store(out + s, h.to(tl.int64, bitcast=True))


def launch(data: torch.Tensor, params: torch.Tensor, consts: torch.Tensor, sums: torch.Tensor,
           out: torch.Tensor) -> None:
    """Digests of the segments ``params`` describes into ``out`` (int64 bit patterns), queued on
    the current stream.

    ``data``: 1-D uint8, 8-byte aligned; ``params``: int64 ``[3, n]``, rows byte offset (a
    multiple of 8), length (> 240) and first row of the segment's block sums (a segment of
    length ``L`` has ``(L - 1) // 1024 + 1`` rows); ``consts``: int64 :data:`CONSTANTS`;
    ``sums``: int64 ``[rows, 8]`` scratch, one row per block of every segment.
    Unchecked: callers go through :func:`kvlink.ops.digest.queue_xxh3`.
    """
    n, rows = params.shape[1], sums.shape[0]
    words = data[: data.numel() // 8 * 8].view(torch.int64)
    _block_sums_kernel[(triton.cdiv(rows, ROWS),)](words, consts, params[0], params[1], params[2], sums, n, rows,
                                                   ROWS=ROWS, SEARCH=SEARCH)
    _finish_kernel[(n,)](data, consts, params[0], params[1], params[2], sums, out, UNROLL=32, num_warps=1)
