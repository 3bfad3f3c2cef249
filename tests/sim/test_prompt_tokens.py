"""Prompt token ids (models/request.py) drawn fast are the ids randrange draws: a request's own
tokens, a Mooncake hash id's block and a prefix group's shared tokens, at every length (a change
of any id would change every prefix-caching trace and the real drivers' prompts)."""

from __future__ import annotations

import random

import pytest

from vllm_faultsim.models.request import MMItem, RequestSpec, hash_block_tokens, prompt_token_ids

pytestmark = pytest.mark.sim


def _draws(seed, n: int) -> list[int]:
    rng = random.Random(seed)
    return [3 + rng.randrange(1000) for _ in range(n)]


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 511, 512, 513, 1100, 4097])
def test_own_tokens_are_randrange_draws(n):
    for i in range(20):
        rid = f"r{i * 7919}"
        assert prompt_token_ids(RequestSpec(rid, 0.0, n, 1)) == _draws(int.from_bytes(rid.encode(), "little"), n)


def test_hash_id_blocks_prefix_groups_and_placeholders():
    for h in range(30):
        assert hash_block_tokens(h, 512) == tuple(_draws(f"hash_id:{h}", 512))
    spec = RequestSpec("x1", 0.0, 1300, 1, prefix=(2, 100), hash_ids=(5, 9), mm=(MMItem("img", 700, 40),))
    want = _draws(int.from_bytes(b"x1", "little"), 1300)
    want[:1024] = hash_block_tokens(5, 512) + hash_block_tokens(9, 512)
    want[:100] = _draws(1_000_003 * 3, 100)
    want[700:740] = [1050] * 40
    assert prompt_token_ids(spec) == want
