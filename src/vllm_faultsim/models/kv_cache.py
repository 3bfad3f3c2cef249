"""The GPU KV block pool and the encoder cache, as vLLM 0.26.0 keeps them.

``BlockPool`` mirrors ``vllm.v1.core.block_pool.BlockPool`` for full attention without prefix
caching: block 0 is the null block; free blocks form a FIFO queue (allocation pops from the
front, a freed request's blocks are appended in reverse order so its tail is reused first).
``EncoderCacheManager`` mirrors ``vllm.v1.core.encoder_cache_manager.EncoderCacheManager``:
capacity in encoder embeddings, shared entries by identifier, lazy eviction of unreferenced
entries (oldest first) when space is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    __slots__ = ("num_gpu_blocks", "free", "req_blocks")

    def __init__(self, num_gpu_blocks: int):
        if num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be >= 2 (block 0 is the null block), got {num_gpu_blocks}")
        self.num_gpu_blocks = num_gpu_blocks
        self.free: deque[int] = deque(range(1, num_gpu_blocks))
        self.req_blocks: dict[str, list[int]] = {}

    def allocate(self, req_id: str, n: int) -> list[int]:
        pop = self.free.popleft
        new = [pop() for _ in range(n)]
        blocks = self.req_blocks.get(req_id)
        if blocks is None:
            self.req_blocks[req_id] = new
        else:
            blocks.extend(new)
        return new

    def free_request(self, req_id: str) -> list[int]:
        blocks = self.req_blocks.pop(req_id, [])
        self.free.extend(reversed(blocks))
        return blocks

    def conservation_error(self, held: int) -> str | None:
        """`held`: the blocks the scheduler believes its requests hold."""
        if held + len(self.free) != self.num_gpu_blocks - 1:
            return (f"KV blocks not conserved: {held} held + {len(self.free)} free "
                    f"!= {self.num_gpu_blocks - 1} usable")
        return None


class EncoderCacheManager:
    __slots__ = ("cache_size", "num_free_slots", "num_freeable_slots", "cached", "request_cached_ids",
                 "freeable")

    def __init__(self, cache_size: int):
        self.cache_size = cache_size
        self.num_free_slots = cache_size
        self.num_freeable_slots = cache_size
        self.cached: dict[str, set[str]] = {}
        self.request_cached_ids: dict[str, set[int]] = {}
        self.freeable: OrderedDict[str, int] = OrderedDict()

    def check_and_update_cache(self, req, i: int) -> bool:
        ident = req.mm[i].identifier
        refs = self.cached.get(ident)
        if refs is None:
            return False
        if not refs:
            self.num_freeable_slots -= self.freeable.pop(ident)
        refs.add(req.req_id)
        self.request_cached_ids.setdefault(req.req_id, set()).add(i)
        return True

    def can_allocate(self, req, i: int, compute_budget: int, num_embeds_to_schedule: int) -> bool:
        num = req.mm[i].length
        if num > compute_budget:
            return False
        num += num_embeds_to_schedule
        if num <= self.num_free_slots:
            return True
        if num > self.num_freeable_slots:
            return False
        while num > self.num_free_slots:
            ident, n = self.freeable.popitem(last=False)
            del self.cached[ident]
            self.num_free_slots += n
        return True

    def allocate(self, req, i: int) -> None:
        ident = req.mm[i].identifier
        self.cached.setdefault(ident, set()).add(req.req_id)
        self.request_cached_ids.setdefault(req.req_id, set()).add(i)
        n = req.mm[i].length
        self.num_free_slots -= n
        self.num_freeable_slots -= n

    def free_encoder_input(self, req, i: int) -> None:
        ids = self.request_cached_ids.get(req.req_id)
        if ids is not None:
            ids.discard(i)
            if not ids:
                del self.request_cached_ids[req.req_id]
        ident = req.mm[i].identifier
        refs = self.cached.get(ident)
        if not refs:
            return
        refs.discard(req.req_id)
        if not refs:
            n = req.mm[i].length
            self.freeable[ident] = n
            self.num_freeable_slots += n

    def free(self, req) -> None:
        for i in list(self.request_cached_ids.get(req.req_id, ())):
            self.free_encoder_input(req, i)
