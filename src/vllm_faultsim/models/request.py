"""What the models take as input: a request's spec (arrival, lengths, multimodal items, shared
prefix, stop point) and its prompt token ids, a pure function of the spec, so the simulator and
every real driver see the same prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

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
    rng = random.Random(f"hash_id:{hash_id}")
    return tuple(3 + rng.randrange(1000) for _ in range(size))


def _own_tokens(seed: int, n: int) -> list[int]:
    """``[3 + random.Random(seed).randrange(1000) for _ in range(n)]``, drawn as randrange draws
    (getrandbits(10) until below 1000: CPython's _randbelow), about 2.4 times as fast."""
    bits = random.Random(seed).getrandbits
    toks: list[int] = []
    add = toks.append
    while len(toks) < n:
        r = bits(10)
        if r < 1000:
            add(3 + r)
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
        grng = random.Random(1_000_003 * (group + 1))
        for i in range(min(plen, n)):
            toks[i] = 3 + grng.randrange(1000)
    for m in spec.mm:
        for i in range(m.offset, min(m.offset + m.length, n)):
            toks[i] = IMAGE_TOKEN_ID
    return toks  # text ids lie in [3, 1003): never EOS (2) nor the image placeholder (1050)
