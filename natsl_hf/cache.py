"""NatslCache: the hybrid decode cache of NAtS-L models on the transformers 5 Cache API.

Per layer it holds a `NatslLayerState` (natsl_hf.modeling.state): the KV of complete softmax
chunks only (compacted per KV group), the open chunk's KV and GDN inputs, the GDN state at the
open chunk's start, the conv state and the router's running sum (SPEC.md section 4). Layers
that stayed full softmax keep every chunk.

Lengths: `get_seq_length()` counts the *columns* processed (padding included), which is what
`generate` slices `input_ids` by; positions and chunk boundaries come from the per-row count of
real tokens kept inside each layer state (`state.seen`), never from the number of kept keys.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .modeling.state import NatslLayerState


class NatslCacheLayer(CacheLayerMixin):
    """One layer's NAtS-L state. Not croppable (a GDN state cannot be rolled back)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: NatslLayerState | None = None
        self.processed = 0  # columns seen, padding included

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "NatslCache layers are updated by NatslAttention through `set_state`, not with dense key/value "
            "states; use this cache only with NAtS-L models."
        )

    def set_state(self, state: NatslLayerState, columns: int) -> None:
        self.state = state
        self.processed += columns
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.processed

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.processed + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.processed, self.is_initialized = None, 0, False

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "NatslCache cannot be cropped: the GDN state cannot be rolled back. Generation strategies that crop "
            "the cache (assisted / speculative decoding, DoLa, contrastive search) are not supported; use greedy, "
            "sampling or beam search."
        )

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.seen.shape[0]

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass


class NatslCache(Cache):
    """The cache `NatslForCausalLM` creates for `generate` / `use_cache=True`."""

    def __init__(self, config=None, num_layers: int | None = None):
        n = num_layers if num_layers is not None else config.num_hidden_layers
        super().__init__(layers=[NatslCacheLayer() for _ in range(n)])
        self.chunk_size = None if config is None else config.chunk_size

    def layer_state(self, layer_idx: int) -> NatslLayerState | None:
        return self.layers[layer_idx].state

    def set_layer_state(self, layer_idx: int, state: NatslLayerState, columns: int) -> None:
        self.layers[layer_idx].set_state(state, columns)

    def memory_report(self) -> dict:
        """Kept softmax KV per layer and bytes, against what a full KV cache of the same tokens holds.

        Per layer: `kept_tokens` (mean over rows and KV groups of kept softmax tokens, the open chunk
        excluded), `open_tokens`, `kv_bytes` (kept + open KV held as valid entries: what the routing
        keeps), `kv_allocated_bytes` (the KV tensors as allocated: the compacted kept KV is padded to the
        longest (row, KV group), and the open chunk is a full chunk-sized buffer), `state_bytes` (GDN state,
        the open chunk's GDN inputs, conv state, router sum), `full_kv_bytes` (a dense cache of every real
        token, what a softmax model holds). Totals at the end; `kv_fraction` = kv_bytes / full_kv_bytes.
        """
        layers = []
        totals = {"kv_bytes": 0, "kv_allocated_bytes": 0, "state_bytes": 0, "full_kv_bytes": 0}
        for idx, layer in enumerate(self.layers):
            s = layer.state
            if s is None:
                continue
            B, Hkv = s.kept_valid.shape[:2]
            per_token = (s.kept_k.shape[-1] + s.kept_v.shape[-1]) * s.kept_k.element_size()  # one group
            kept = s.kept_valid.sum().item()  # over rows and groups
            open_tokens = (s.seen % s.open_k.shape[1]).sum().item() * Hkv
            kv_bytes = int((kept + open_tokens) * per_token)
            allocated = sum(t.numel() * t.element_size() for t in (s.kept_k, s.kept_v, s.open_k, s.open_v))
            state_bytes = sum(
                t.numel() * t.element_size()
                for t in (s.gdn_state, s.conv_state, s.router_sum, s.gdn_k, s.gdn_g, s.gdn_beta)
                if t is not None
            )
            full = int(s.seen.sum().item() * Hkv * per_token)
            layers.append(
                {
                    "layer": idx,
                    "kept_tokens": kept / (B * Hkv),
                    "open_tokens": open_tokens / (B * Hkv),
                    "kv_bytes": kv_bytes,
                    "kv_allocated_bytes": int(allocated),
                    "state_bytes": int(state_bytes),
                    "full_kv_bytes": full,
                }
            )
            totals["kv_bytes"] += kv_bytes
            totals["kv_allocated_bytes"] += int(allocated)
            totals["state_bytes"] += int(state_bytes)
            totals["full_kv_bytes"] += full
        totals["kv_fraction"] = totals["kv_bytes"] / max(totals["full_kv_bytes"], 1)
        return {"layers": layers, **totals}


__all__ = ["NatslCache", "NatslCacheLayer"]
