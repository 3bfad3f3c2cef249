"""A KV connector whose remote store holds the first tokens of given requests: the twin of the
stand-in harness/drivers/external_kv_connector.py (upstream's ``MockKVConnector``), for scheduler
checks that need external computed tokens (loads complete within the step: no worker side).

It implements the hooks the scheduler twin calls on ``Scheduler.kv_connector``
(models/scheduler.py); only ``get_num_new_matched_tokens`` does something: it offers the held
tokens beyond the local prefix-cache hit, at most the prompt less its last token.
"""

from __future__ import annotations


class ExternalTokensConnector:
    is_kv_consumer = True  # the stand-in runs as kv_role "kv_both": block freeing is deferred under async

    def __init__(self, external: dict[str, int]):
        self.external = dict(external)  # req -> first prompt tokens the remote store holds

    def get_num_new_matched_tokens(self, req, num_computed_tokens: int) -> tuple[int, bool]:
        held = min(self.external.get(req.req_id, 0), req.num_prompt_tokens - 1)
        return max(0, held - num_computed_tokens), False

    # the other hooks: nothing to track
    def on_new_request(self, req) -> None: ...
    def on_preempt(self, req) -> None: ...
    def promote(self, req) -> bool: return True
    def inflight_prefill_reserved_blocks(self) -> int: return 0
    def update_state_after_alloc(self, req, block_ids, num_external: int, num_hit: int) -> None: ...
    def wait_for_remote_kvs(self, req, computed: int) -> None: ...
    def admitted(self, req, computed: int) -> None: ...
    def build_connector_meta(self, res, now: float) -> None: ...
    def request_finished(self, req) -> None: ...
    def get_finished(self, now: float) -> None: ...
    def update_connector_output(self, res) -> None: ...
