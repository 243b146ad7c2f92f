"""One batched decode step over requests that each keep their own (compressed) cache.

:class:`BatchedCache` is a transformers ``Cache`` that the model sees for one forward of B
requests, one new token each. Each request owns a one-sequence cache of any lowbit method (a
``DynamicCache``, a ``KiviCache``, a budget cache, ...). Before the step, request b's own cache says
how many tokens it has seen (``get_seq_length()``: the new token's RoPE position P_b) and how many
keys its ``update`` will return (``get_mask_sizes(1)[0]``: K_b, which is P_b + 1 unless the method
drops or merges tokens). For decoder layer i, ``update(key [B,H,1,D], value [B,H,1,D])`` splits the
batch, lets every request's own layer cache store its token (quantizing, evicting, ... as that method
does) and return its keys/values [1,H,K_b,D], and left-pads them with zeros into [B,H,T,D],
T = max K_b. The padding is hidden by the 2D attention mask (:func:`decode_inputs`: row b attends to
its last K_b slots) and every row gets its true position P_b through explicit ``position_ids``, so
each row computes what a batch-1 decode of that request computes.

The mask sizes the model asks for are those of the padded batch: ``get_mask_sizes(1) = (T, 0)`` and
query offset T - 1 (every slot is causally visible; padding is masked). Methods that score keys with
the attention queries (:mod:`lowbit.kv.attention`) get their own row of the batch's queries: the padded
keys are marked with a :class:`_RowObservers` that splits the attention call's queries by row. A request whose own cache raises in ``update`` (or returns an unexpected number of
keys) is recorded in :attr:`BatchedCache.failed` and gets zero keys/values for the rest of the
forward; the other rows are unaffected and the caller fails only that request.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.kv.attention import attach, target_of


class _RowObservers:
    """Hands each row's slice of the attention call's queries to the layer cache that asked for them."""

    def __init__(self, owner: "BatchedCache", targets: list[tuple[int, object]]):
        self.owner, self.targets = owner, targets

    def observe_queries(self, query: torch.Tensor) -> None:
        for b, target in self.targets:
            if b in self.owner.failed:
                continue
            try:
                target.observe_queries(query[b : b + 1])
            except Exception as exc:  # noqa: BLE001 - isolate one request's failure
                self.owner.failed[b] = exc


class _BatchedLayer(DynamicLayer):
    """The view of one decoder layer across the batch (holds nothing itself)."""

    def __init__(self, owner: "BatchedCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._update_layer(self.layer_idx, key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.owner.past_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.owner.past_length + q, 0

    def reset(self) -> None:  # the per-request caches are owned elsewhere
        pass


class BatchedCache(Cache):
    """The per-request caches of one decode step, seen by the model as one left-padded batch."""

    def __init__(self, caches: list[Cache], num_layers: int):
        self.caches = list(caches)
        self.positions = [c.get_seq_length() for c in self.caches]  # tokens seen = the new token's position
        self.kv_lengths = [c.get_mask_sizes(1, 0)[0] for c in self.caches]  # keys each update will return
        self.past_length = max(self.kv_lengths) - 1 if self.kv_lengths else 0
        self.failed: dict[int, BaseException] = {}
        super().__init__(layers=[_BatchedLayer(self, i) for i in range(num_layers)])

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past_length

    def _update_layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch, q_len = key_states.shape[0], key_states.shape[-2]
        if batch != len(self.caches):
            raise ValueError(f"BatchedCache holds {len(self.caches)} requests but got a batch of {batch}")
        if q_len != 1:
            raise ValueError("BatchedCache decodes one token per request per step")
        if batch == 1 and not self.failed:
            try:
                return self.caches[0].update(key_states, value_states, layer_idx, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the request's own cache failed, not the model
                self.failed[0] = exc
        total = self.past_length + q_len
        keys = key_states.new_zeros(batch, key_states.shape[1], total, key_states.shape[-1])
        values = value_states.new_zeros(batch, value_states.shape[1], total, value_states.shape[-1])
        targets = []
        for b, cache in enumerate(self.caches):
            if b in self.failed:
                continue
            try:
                k, v = cache.update(key_states[b : b + 1], value_states[b : b + 1], layer_idx, *args, **kwargs)
                n = k.shape[-2]
                if n != self.kv_lengths[b]:
                    raise RuntimeError(
                        f"request cache returned {n} keys at layer {layer_idx}, its mask sizes said {self.kv_lengths[b]}"
                    )
                keys[b, :, total - n :] = k[0]
                values[b, :, total - n :] = v[0]
                if target_of(k) is not None:
                    targets.append((b, target_of(k)))
            except Exception as exc:  # noqa: BLE001 - isolate one request's failure
                self.failed[b] = exc
        return (attach(keys, _RowObservers(self, targets)) if targets else keys), values


def decode_inputs(last_tokens: list[int], positions: list[int], kv_lengths: list[int] | None = None,
                  device="cpu") -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (2D, left padding hidden) and ``position_ids`` for one decode step.

    `positions` are the tokens each request has seen before this step (the new token's position);
    `kv_lengths` the keys each request's cache will return this step (default ``positions + 1``).
    """
    batch = len(last_tokens)
    kv_lengths = [p + 1 for p in positions] if kv_lengths is None else kv_lengths
    total = max(kv_lengths)
    mask = torch.zeros(batch, total, dtype=torch.long)
    for b, n in enumerate(kv_lengths):
        mask[b, total - n :] = 1
    return {
        "input_ids": torch.tensor(last_tokens, dtype=torch.long).view(batch, 1).to(device),
        "attention_mask": mask.to(device),
        "position_ids": torch.tensor(positions, dtype=torch.long).view(batch, 1).to(device),
    }
