"""What the models take as input: a request's spec (arrival, lengths, multimodal items, shared
prefix, stop point) and its prompt token ids, a pure function of the spec, so the simulator and
every real driver see the same prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass

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


def prompt_token_ids(spec: RequestSpec) -> list[int]:
    """The prompt's token ids: deterministic, shared within a prefix group, placeholders for images."""
    n = spec.prompt_len
    seed = int.from_bytes(spec.req_id.encode(), "little") % (2**31)
    rng = random.Random(seed)
    toks = [3 + rng.randrange(1000) for _ in range(n)]
    if spec.prefix is not None:
        group, plen = spec.prefix
        grng = random.Random(1_000_003 * (group + 1))
        for i in range(min(plen, n)):
            toks[i] = 3 + grng.randrange(1000)
    for m in spec.mm:
        for i in range(m.offset, min(m.offset + m.length, n)):
            toks[i] = IMAGE_TOKEN_ID
    return toks  # text ids lie in [3, 1003): never EOS (2) nor the image placeholder (1050)
