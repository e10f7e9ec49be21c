"""Pool entries of a request, packed out of and restored into a paged cache.

A pool block of ``P`` tokens (a multiple of the cache's block size) is stored as self-describing
payloads: its full-window token tensors (one ``full`` entry: K/V, MLA latents, indexer keys),
its windowed ones (a ``sliding`` entry: sliding and chunked windows) and, when a state checkpoint
lies at its end, every state tensor (a ``state`` entry). A layer holding attention and an SSM
contributes to both.
Every entry carries its own checksums and the spec fingerprint, so a restore from any tier (or
from the daemon) is verified before a byte lands in the cache.
"""

from __future__ import annotations

from kvlink.errors import ConfigError, PoolError
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, Unpacker, check_compatible


_GROUP = {FULL: "full", SLIDING: "window", STATE: "state"}  # pool entry kind -> spec component group


def _groups(cache: PagedCache) -> dict[str, list[int]]:
    """Layers holding components of each entry kind."""
    return {kind: sorted({layer for layer, _ in cache.spec.group(group)}) for kind, group in _GROUP.items()}


def check_block_size(cache: PagedCache, pool_block: int) -> None:
    if pool_block % cache.block_size:
        raise ConfigError(f"pool block size {pool_block} must be a multiple of the cache's {cache.block_size}")


def pack_pieces(cache: PagedCache, ref: CacheRef, pool_block: int, first_block: int = 0) -> dict:
    """``{(kind, block): buffers}`` for every full pool block of ``ref`` from ``first_block`` on
    (each value a payload's header and segment buffers: the pool and the transport take them as
    they are, without joining them into one copy first).

    The state entry goes with the last block only when the request ends exactly on a pool
    block boundary: the slot holds the state at ``ref.num_tokens`` and nowhere else.
    """
    check_block_size(cache, pool_block)
    packer = Packer(cache)
    groups = _groups(cache)
    nblocks = ref.num_tokens // pool_block
    pieces = {}
    for b in range(first_block, nblocks):
        span = ref.span((b + 1) * pool_block, b * pool_block)
        for kind in (FULL, SLIDING):
            if groups[kind]:
                pieces[(kind, b)] = packer.pack(span, groups[kind], group=_GROUP[kind]).buffers()
    if groups[STATE] and nblocks and nblocks * pool_block == ref.num_tokens:
        end = ref.span(ref.num_tokens, ref.num_tokens)
        pieces[(STATE, nblocks - 1)] = packer.pack(end, groups[STATE], group="state").buffers()
    return pieces


def restore_pieces(cache: PagedCache, hit: PrefixHit, entries: dict, ref: CacheRef, pool_block: int) -> int:
    """Write the entries of ``hit`` (``{(kind, key): bytes}``, from ``Pool.fetch`` or the daemon)
    into ``ref``'s blocks and slot; returns the tokens restored (``hit.tokens``).

    Everything is checked before anything is written: the hit against the spec (a full entry per
    block, the window's blocks, a state exactly when the model has states), each entry's token
    range, layers and components against its group, and every checksum. Raises :class:`PoolError`
    for a hit or entry of the wrong shape, and the entry's typed error otherwise
    (:class:`~kvlink.errors.ChecksumMismatch`, :class:`~kvlink.errors.FingerprintMismatch`,
    :class:`~kvlink.errors.IncompatibleLayoutError`).
    """
    check_block_size(cache, pool_block)
    groups = _groups(cache)
    blocks = hit.tokens // pool_block
    window = -(-cache.spec.window_tokens // pool_block) if groups[SLIDING] else 0
    want = {FULL: blocks if groups[FULL] else 0, SLIDING: min(window, blocks),
            STATE: 1 if groups[STATE] and blocks else 0}
    got = {FULL: len(hit.full), SLIDING: len(hit.sliding), STATE: int(hit.state is not None)}
    if hit.tokens % pool_block or got != want:
        raise PoolError(f"a hit of {hit.tokens} tokens with {got} entries cannot restore {cache.spec.name}: "
                        f"it needs {want}")
    jobs = [(FULL, key, b * pool_block, (b + 1) * pool_block) for b, key in enumerate(hit.full)]
    jobs += [(SLIDING, key, b * pool_block, (b + 1) * pool_block)
             for b, key in enumerate(hit.sliding, start=blocks - len(hit.sliding))]
    if hit.state is not None:
        jobs.append((STATE, hit.state, hit.tokens, hit.tokens))
    checked = []
    for kind, key, start, end in jobs:
        payload = Payload.from_buffer(entries[(kind, key)])
        header, span = payload.header, ref.span(end, start)
        layers = sorted({seg.layer for seg in header.segments})
        if (header.token_start, header.token_end) != (start, end) or layers != groups[kind]:
            raise PoolError(f"{kind} entry {key.hex()[:16]}: tokens [{header.token_start}, {header.token_end}) of "
                            f"layers {layers}, expected [{start}, {end}) of layers {groups[kind]}")
        check_compatible(payload, cache, span, _GROUP[kind])
        checked.append((payload, span, _GROUP[kind]))
    unpacker = Unpacker(cache)
    for payload, span, group in checked:
        payload.verify()  # all of them before the first write
    for payload, span, group in checked:
        unpacker.unpack(payload, span, verify=False, group=group)
    return hit.tokens
