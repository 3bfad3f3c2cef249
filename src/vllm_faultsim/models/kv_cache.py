"""The GPU KV block pool and the encoder cache, as vLLM 0.26.0 keeps them.

``BlockPool`` mirrors ``vllm.v1.core.block_pool.BlockPool`` for one full-attention group: block 0
is the null block; allocation pops the free queue's front (evicting the block's cached hash); a
freed request's blocks are released in reverse order, hashless ones to the front of the queue,
cached ones to the back (evicted last); with prefix caching, full blocks carry a hash and a
waiting request reuses the longest run of cached blocks from its start (``touch``).
``EncoderCacheManager`` mirrors ``vllm.v1.core.encoder_cache_manager.EncoderCacheManager``:
capacity in encoder embeddings, shared entries by identifier, lazy eviction of unreferenced
entries (oldest first) when space is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import islice


class BlockPool:
    """Block ids, ref counts, the free queue and (with prefix caching) the hash -> block map."""

    __slots__ = ("num_gpu_blocks", "enable_caching", "free", "ref_cnt", "block_hash", "cached", "req_blocks",
                 "num_cached_block", "deferred_frees", "hashless_first")

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = False, hashless_first: bool = True):
        if num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be >= 2 (block 0 is the null block), got {num_gpu_blocks}")
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        # vLLM 0.26.0's free_blocks puts freed blocks without a hash at the front (evicted first);
        # 0.23.0's appends every freed block in order (Scheduler.frees_hashless_first, for_release).
        # free_request without prefix caching keeps 0.26.0's order for both: no block has a hash
        # there, so the ids it hands out decide nothing
        self.hashless_first = hashless_first
        # the free queue: with prefix caching an OrderedDict, front first (a hit takes a cached block
        # from anywhere in it); else a list, front *last* (blocks leave the front, and freed ones rejoin
        # it: a stack, taken and given back a request's blocks at a time by slices)
        self.free: OrderedDict[int, None] | list[int] = (OrderedDict.fromkeys(range(1, num_gpu_blocks))
                                                         if enable_caching else list(range(num_gpu_blocks - 1, 0, -1)))
        self.ref_cnt: dict[int, int] = {}
        self.block_hash: dict[int, object] = {}
        self.cached: dict[object, dict[int, None]] = {}   # hash -> blocks holding it, first = served
        self.req_blocks: dict[str, list[int]] = {}
        self.num_cached_block: dict[str, int] = {}
        # blocks popped from freed requests and held until a fence step is processed: (fence, blocks)
        # (Scheduler.deferred_frees; models/offload_scheduler.py)
        self.deferred_frees: deque[tuple[int, list[int]]] = deque()

    def get_computed_blocks(self, block_hashes: list, max_length: int, block_size: int) -> list[int]:
        """The longest run of cached full blocks from the start (find_longest_cache_hit)."""
        hit = []
        cached = self.cached
        for h in block_hashes[:max_length // block_size]:
            blocks = cached.get(h)
            if not blocks:
                break
            hit.append(next(iter(blocks)))
        return hit

    def num_evictable(self, blocks: list[int]) -> int:
        """Hit blocks that sit in the free queue: touching them takes them out of it."""
        ref = self.ref_cnt
        return sum(1 for b in blocks if b not in ref)

    def allocate_computed(self, req_id: str, hit: list[int]) -> None:
        """Touch the prefix-cache hit blocks and give them to the request."""
        ref, free = self.ref_cnt, self.free
        for b in hit:
            if b in ref:
                ref[b] += 1
            else:
                del free[b]
                ref[b] = 1
        self.req_blocks[req_id] = list(hit)
        self.num_cached_block[req_id] = len(hit)

    def allocate(self, req_id: str, n: int) -> list[int]:
        free, ref = self.free, self.ref_cnt
        if not self.enable_caching:  # the free queue's front: the list's end
            cut = len(free) - n if n < len(free) else 0
            new = free[cut:]
            del free[cut:]
            new.reverse()
            for b in new:  # (ref.update(dict.fromkeys(new, 1)) is slower: update resizes the large ref_cnt often)
                ref[b] = 1
        else:
            new = list(islice(free, n))
            for b in new:
                del free[b]
                ref[b] = 1
            for b in new:
                h = self.block_hash.pop(b, None)
                if h is not None:  # _maybe_evict_cached_block
                    holders = self.cached[h]
                    del holders[b]
                    if not holders:
                        del self.cached[h]
        blocks = self.req_blocks.get(req_id)
        if blocks is None:
            self.req_blocks[req_id] = new
        else:
            blocks.extend(new)
        return new

    def allocate_each(self, req_ids) -> None:
        """One new block for each request of `req_ids`, in order: ``allocate(rid, 1)`` each (the
        decode cohort's block takers); without prefix caching no hash is evicted."""
        if self.enable_caching:
            for rid in req_ids:
                self.allocate(rid, 1)
            return
        free, ref, req_blocks = self.free, self.ref_cnt, self.req_blocks
        for rid in req_ids:
            b = free.pop()
            ref[b] = 1
            blocks = req_blocks.get(rid)
            if blocks is None:
                req_blocks[rid] = [b]
            else:
                blocks.append(b)

    def cache_blocks(self, req_id: str, block_hashes: list, num_tokens: int, block_size: int) -> None:
        """Give the request's newly full blocks their hashes (cache_full_blocks)."""
        start = self.num_cached_block.get(req_id, 0)
        num_full = num_tokens // block_size
        if start >= num_full:
            return
        blocks = self.req_blocks[req_id]
        for i in range(start, num_full):
            b, h = blocks[i], block_hashes[i]
            self.block_hash[b] = h
            self.cached.setdefault(h, {})[b] = None
        self.num_cached_block[req_id] = num_full

    def free_request(self, req_id: str) -> list[int]:
        """Free in reverse order: hashless blocks go to the front, cached ones to the back."""
        blocks = self.req_blocks.pop(req_id, [])
        ref, free = self.ref_cnt, self.free
        if not self.enable_caching:  # every block has one reference and no hash: each to the front
            for b in blocks:
                del ref[b]
            free.extend(blocks)
            return blocks
        self.num_cached_block.pop(req_id, None)
        self.free_blocks(reversed(blocks))
        return blocks

    def pop_blocks_for_free(self, req_id: str) -> list[int]:
        """The request's blocks (allocation order), taken from it but not returned to the pool."""
        self.num_cached_block.pop(req_id, None)
        return self.req_blocks.pop(req_id, [])

    def free_blocks(self, ordered_blocks) -> None:
        """``BlockPool.free_blocks``: drop one reference of each; the freed hashless blocks go to
        the front of the free queue, the cached ones to its back (in the given order)."""
        ref, free = self.ref_cnt, self.free
        hashed = self.block_hash
        without_hash = []
        for b in ordered_blocks:
            if ref[b] > 1:
                ref[b] -= 1
                continue
            del ref[b]
            if self.hashless_first and b not in hashed:
                without_hash.append(b)
            elif self.enable_caching:
                free[b] = None
            else:  # a list, front last (no prefix caching): to the back
                free.insert(0, b)
        if not self.enable_caching:
            free.extend(reversed(without_hash))
            return
        for b in reversed(without_hash):
            free[b] = None
            free.move_to_end(b, last=False)

    def conservation_error(self, deep: bool = False) -> str | None:
        """held + free = the pool; deep: also recount every request's references (O(blocks))."""
        held = len(self.ref_cnt)
        if held + len(self.free) != self.num_gpu_blocks - 1:
            return (f"KV blocks not conserved: {held} held + {len(self.free)} free "
                    f"!= {self.num_gpu_blocks - 1} usable")
        if not deep:
            return None
        refs: dict[int, int] = {}
        for blocks in [*self.req_blocks.values(), *(blocks for _, blocks in self.deferred_frees)]:
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        if refs != self.ref_cnt:
            return "KV block ref counts differ from the blocks requests hold"
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
