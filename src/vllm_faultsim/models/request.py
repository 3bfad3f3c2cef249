"""What the models take as input: a request's spec (arrival, lengths, multimodal items, shared
prefix, stop point) and its prompt token ids, a pure function of the spec, so the simulator and
every real driver see the same prompts."""

from __future__ import annotations

import random
import sys
from array import array
from dataclasses import dataclass
from functools import lru_cache
from itertools import compress

IMAGE_TOKEN_ID = 1050  # the placeholder id of the tiny LLaVA model folder (harness/drivers/model_dirs.py writes it)


@dataclass(frozen=True)
class MMItem:
    """A multimodal item (an image): its identifier (hash), placeholder range and prefetch latency.

    ``prefetch`` is how long the EC connector needs to stage the encoder output from the remote
    store after the request arrives (``None``: not in the remote store, encode locally).
    """

    identifier: str
    offset: int
    length: int
    prefetch: float | None = 0.0


@dataclass(frozen=True)
class RequestSpec:
    req_id: str
    arrival: float
    prompt_len: int
    output_len: int
    mm: tuple[MMItem, ...] = ()
    # (group, length): the first `length` prompt tokens are shared by every request of `group`
    prefix: tuple[int, int] | None = None
    # emit the stop token (EOS) as output token number `stop_at` (1-based) instead of running to max
    stop_at: int | None = None
    # Mooncake-style block hashes: prompt tokens [i*chunk_hash_size, (i+1)*chunk_hash_size) are a pure
    # function of hash_ids[i], so requests whose hash ids start alike share those prompt tokens
    hash_ids: tuple[int, ...] = ()
    chunk_hash_size: int = 512


@lru_cache(maxsize=4096)
def hash_block_tokens(hash_id: int, size: int) -> tuple[int, ...]:
    """The `size` token ids of the prompt block a trace names `hash_id` (a pure function of both)."""
    return tuple(_own_tokens(f"hash_id:{hash_id}", size))


# the 16 high bits of a 32-bit Mersenne Twister word -> 3 + randrange(1000)'s draw from that word
# (the word's 10 high bits, accepted below 1000: CPython's _randbelow), 0 where it is rejected
_TOKEN_OF_HIGH_BITS = (lambda ids: tuple(ids[h >> 6] if h < 64000 else 0 for h in range(1 << 16)))(
    [3 + i for i in range(1000)])


def _own_tokens(seed: int | str, n: int) -> list[int]:
    """``rng = random.Random(seed); [3 + rng.randrange(1000) for _ in range(n)]``: randrange(1000) takes the 10
    high bits of the generator's next 32-bit word until they are below 1000, and ``randbytes(4 * m)``
    is the next m words, little-endian; the accepted ones are mapped by a table and kept in order."""
    rng = random.Random(seed)
    table = _TOKEN_OF_HIGH_BITS
    toks: list[int] = []
    while len(toks) < n:
        m = n - len(toks) + 16  # about 2.3% of the words are rejected
        halves = array("H", rng.randbytes(4 * m))
        if sys.byteorder == "big":
            halves.byteswap()
        drawn = [table[h] for h in halves[1::2]]
        toks += compress(drawn, drawn)
    del toks[n:]
    return toks


def prompt_token_ids(spec: RequestSpec) -> list[int]:
    """The prompt's token ids: deterministic, shared within a prefix group or a run of leading hash
    ids (the tokens past the hash ids' blocks are the request's own), placeholders for images."""
    n = spec.prompt_len
    # the whole id: `% 2**31` kept 4 bytes, so r1000..r1009 drew r100's prompt (prefix-cache hits between them)
    seed = int.from_bytes(spec.req_id.encode(), "little")
    toks = _own_tokens(seed, n)
    size = spec.chunk_hash_size
    for i, h in enumerate(spec.hash_ids[:-(-n // size)]):
        block = hash_block_tokens(h, size)
        toks[i * size:(i + 1) * size] = block[:n - i * size]
    if spec.prefix is not None:
        group, plen = spec.prefix
        shared = min(plen, n)
        toks[:shared] = _own_tokens(1_000_003 * (group + 1), shared)
    for m in spec.mm:
        for i in range(m.offset, min(m.offset + m.length, n)):
            toks[i] = IMAGE_TOKEN_ID
    return toks  # text ids lie in [3, 1003): never EOS (2) nor the image placeholder (1050)
