"""A lean decoder runner for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) over the engine's paged store.

It drives the Hugging Face model's own modules -- embedding, norms, projections (plain ``nn.Linear`` or lowbit's
W4A8/W4A4 ``QuantLinear``), MLP (with LUT activations if swapped in), rotary embedding, LM head -- but not its
attention or cache code: a decode step is ``B`` rows, one token each, and every layer stores its new key and
value in the paged store and attends through it (:meth:`KVStore.append`, :meth:`KVStore.attend`). Nothing in
a step depends on host values, so :class:`DecodeGraphs` captures it in a CUDA graph per batch bucket.

Why not HF's forward with a registered attention function: its mask and cache plumbing run Python per layer
and per step and build position/mask tensors on the host; the runner's step is only the tensor work.
Prefill runs the prompt through the same modules in full precision (SDPA, causal) and stores its keys and
values (quantized into pages by the KIVI store).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")
# a prefill stores its layers' K/V in groups of up to this many bytes: one set of store launches per group instead of
# per layer (the KIVI prompt write is ~40 small launches, host-bound: 1,024 tokens at the Llama-3-8B shape took
# 67 ms with per-layer writes against 32 ms for fp16 pages, H200 host, stop 29)
PROMPT_WRITE_BYTES = 256 << 20


def _rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


class LlamaRunner:
    """Prefill and decode of a Llama-family ``*ForCausalLM`` over a paged :class:`~lowbit.engine.store.KVStore`."""

    def __init__(self, model, store):
        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            raise ValueError(f"the engine runs {', '.join(SUPPORTED)} models; got model_type="
                             f"'{getattr(cfg, 'model_type', None)}'")
        inner = model.model
        self.model, self.store = model, store
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        world = getattr(model, "lowbit_tp", (0, 1))[1]  # tensor-parallel shard: this rank's heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.heads = cfg.num_attention_heads // world
        self.kv_heads = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // world
        if (store.layers, store.kv_heads, store.head_dim) != (len(self.layers), self.kv_heads, self.head_dim):
            raise ValueError(f"store shape {(store.layers, store.kv_heads, store.head_dim)} does not match the model's "
                             f"{(len(self.layers), self.kv_heads, self.head_dim)} (layers, KV heads, head dim)")
        self.apply_rope = _rope()

    def _qkv(self, attn, h, b, n):
        q = attn.q_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    @torch.inference_mode()
    def prefill(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Run prompt ``ids [n]`` into row `row` of the store; the logits of its last token ``[V]``."""
        n = ids.shape[0]
        x = self.embed(ids[None])
        pos = torch.arange(n, device=ids.device)[None]
        cos, sin = self.rotary(x, pos)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # layers' K/V not yet stored (written in groups)
        per_layer = 2 * self.kv_heads * n * self.head_dim * x.element_size()  # one layer's K and V
        group = max(1, PROMPT_WRITE_BYTES // per_layer)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(attn, h, 1, n)
            q, k = self.apply_rope(q, k, cos, sin)
            pending.append((k[0], v[0]))
            if len(pending) == group or i == len(self.layers) - 1:
                self.store.write_prompt_layers(i + 1 - len(pending), row, torch.stack([p[0] for p in pending]),
                                               torch.stack([p[1] for p in pending]))
                pending.clear()
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                               enable_gqa=self.heads != self.kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, -1]))[0]

    @torch.inference_mode()
    def prefill_chunk(self, row: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run prompt tokens ``ids [c]`` at positions ``start..start+c-1`` into `row`, which holds the prompt's
        first `start` tokens; the logits of the chunk's last token ``[V]``. The chunk attends to the stored tokens
        as the store gives them back (dequantized for KIVI) and to its own in full precision (causal)."""
        if start == 0:
            return self.prefill(row, ids)
        n = ids.shape[0]
        x = self.embed(ids[None])
        pos = torch.arange(start, start + n, device=ids.device)[None]
        cos, sin = self.rotary(x, pos)
        mask = torch.ones(n, start + n, dtype=torch.bool, device=ids.device).tril(start)  # key j <= start + i
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(attn, h, 1, n)
            q, k = self.apply_rope(q, k, cos, sin)
            old_k, old_v = self.store.read_tokens(i, row, start)  # before the write: it moves the ring
            keys = torch.cat([old_k.to(k.dtype)[None], k], dim=2)
            values = torch.cat([old_v.to(v.dtype)[None], v], dim=2)
            self.store.write_tokens(i, row, k[0], v[0], start)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=self.heads != self.kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, -1]))[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One step of rows 0..B-1: ``tokens [B]`` at positions ``pos [B]`` -> logits ``[B, V]``."""
        b = tokens.shape[0]
        x = self.embed(tokens[:, None])
        cos, sin = self.rotary(x, pos[:, None])
        self.store.begin_step(pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(attn, h, b, 1)
            q, k = self.apply_rope(q, k, cos, sin)
            self.store.append(i, pos, k[:, :, 0], v[:, :, 0])
            o = self.store.attend(i, q[:, :, 0], pos, attn.scaling)
            x = x + attn.o_proj(o.reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, 0]))


class DecodeGraphs:
    """CUDA graphs of :meth:`LlamaRunner.decode` at bucketed batch sizes (powers of two up to the store's rows).

    Inputs are copied into static buffers; rows past the live batch are padding (free rows: their table points
    at the scratch block). ``graphs=False`` (or no CUDA) runs the step eagerly with the same interface.
    """

    def __init__(self, runner: LlamaRunner, graphs: bool = True):
        self.runner = runner
        store = runner.store
        self.device = store.device
        self.rows = store.rows
        self.tokens = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.enabled = graphs and self.device.type == "cuda"
        self.buckets = sorted({min(1 << i, self.rows) for i in range(self.rows.bit_length() + 1)})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, b: int) -> int:
        return next(s for s in self.buckets if s >= b)

    def capture(self, sizes=None) -> None:
        """Capture the graphs now, while no row is live (each bucket's warm-up steps write rows 0..size-1)."""
        if not self.enabled:
            return
        for size in sizes or self.buckets:
            if size in self.graphs:
                continue
            self.pos[:size].zero_()  # free rows: position 0 writes only their own ring / the scratch block
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.runner.decode(self.tokens[:size], self.pos[:size])
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.runner.decode(self.tokens[:size], self.pos[:size])
            self.pool = graph.pool()
            self.graphs[size] = (graph, out)

    def step(self, b: int, limit: int | None = None) -> torch.Tensor:
        """Decode rows 0..b-1 from the static ``tokens``/``pos`` buffers (filled by the caller): logits ``[b, V]``.
        `limit`: rows from this one on must not be touched (a prompt is being prefilled there), so a graph whose
        padding rows reach it is not replayed."""
        if not self.enabled:
            return self.runner.decode(self.tokens[:b], self.pos[:b])
        size = self.bucket(b)
        if size not in self.graphs or (limit is not None and size > limit):  # run this step eagerly
            return self.runner.decode(self.tokens[:b], self.pos[:b])
        self.pos[b:size].zero_()
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
