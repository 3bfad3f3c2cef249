"""Stand-in vLLM KV connectors: ``ExternalTokensKVConnector``, whose remote store holds the first
tokens of given requests, for scheduler tests (upstream's ``MockKVConnector``, loads synchronous),
and its base ``NoOpKVConnector`` (no tokens, no metadata, no worker side).

vLLM loads it like any out-of-tree connector (``KVTransferConfig(kv_connector=
"ExternalTokensKVConnector", kv_connector_module_path=__name__)``; ``RealSchedulerCore(...,
kv_external={...})`` does). ``external`` maps a request id to the number of its prompt's first
tokens the remote store holds: ``get_num_new_matched_tokens`` offers those beyond the local
prefix-cache hit (at most the prompt less its last token, which is always computed), loaded
within the step. Each step's metadata (:class:`ExternalTokensMetadata`) counts the tokens every
admitted request got from it. The loads are complete when the step is scheduled: there is no
worker side. Importing this module imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata


@dataclass
class ExternalTokensMetadata(KVConnectorMetadata):
    num_external_tokens: dict[str, int] = field(default_factory=dict)  # req -> tokens loaded this step


class NoOpKVConnector(KVConnectorBase_V1):
    """A KV connector that offers no tokens, sends no metadata and has nothing to do on the worker."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output):
        return None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None


class ExternalTokensKVConnector(NoOpKVConnector):
    """Offers each request the tokens of ``external`` beyond its local prefix-cache hit."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.external: dict[str, int] = {}  # req -> first prompt tokens the remote store holds
        self._loaded: dict[str, int] = {}

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        held = min(self.external.get(request.request_id, 0), request.num_prompt_tokens - 1)
        return max(0, held - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens:
            self._loaded[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output) -> ExternalTokensMetadata:
        meta, self._loaded = ExternalTokensMetadata(self._loaded), {}
        return meta
