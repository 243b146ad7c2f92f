"""The streaming protocol: prefill P tokens in one forward, then feed T tokens one at a time through the cache.

At every step the method's next-token distribution is compared with the uncompressed model's on the
same prefix (computed once by :func:`reference_run` and reused for every method). Predictions cover
the T tokens after the prefill: the first comes from the prefill's last logits, the others from the
T-1 single-token decode steps, exactly as generation would produce them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache

from lowbit.kv.hf import cache_kwargs
from lowbit.kv.registry import KV_PRESETS, KVShape, cache_bytes, cache_nbytes, is_exact, make_cache, parse_kv_spec

BITS_AT = 4096  # the length at which bits per element are also reported (the registry's closed form)


def bits_per_element_at(kv: str, config, n_tokens: int = BITS_AT) -> float:
    """Stored bits per K/V element, every overhead counted, of a one-sequence `kv` cache after `n_tokens` tokens."""
    shape = KVShape.from_config(config)
    return 8 * cache_bytes(kv, shape, n_tokens) / (shape.layers * n_tokens * 2 * shape.kv_heads * shape.head_dim)


def kv_family(kv: str) -> str:
    """The line a spec belongs to in the frontier plot: its method (``a+b`` for compositions), or ``preset``."""
    if all(p.strip().lower() in KV_PRESETS for p in kv.split("+")):
        return "preset"
    return "+".join(p.name for p in parse_kv_spec(kv))


@dataclass
class ReferenceRun:
    """The uncompressed model's log-probabilities at each evaluated position."""

    logprobs: torch.Tensor  # [T, vocab] float32
    targets: torch.Tensor  # [T]
    seconds: float
    kv_bytes: tuple[int, int] = (0, 0)  # (held, fp16) bytes of its cache after the last step

    @property
    def nll(self) -> torch.Tensor:
        return -self.logprobs.gather(-1, self.targets[:, None]).squeeze(-1)


@dataclass
class EvalResult:
    """What one method cost, measured against the uncompressed reference."""

    method: str
    ppl: float
    ppl_ref: float
    kl_mean: float
    kl_max: float
    top1_agree: float
    kv_bytes: int
    kv_bytes_fp16: int
    tokens: int
    prefill: int
    tokens_per_s: float
    extra: dict = field(default_factory=dict)

    @property
    def compression(self) -> float:
        return self.kv_bytes_fp16 / self.kv_bytes if self.kv_bytes else float("nan")

    @property
    def bits_per_element(self) -> float:
        return 16.0 * self.kv_bytes / self.kv_bytes_fp16 if self.kv_bytes_fp16 else float("nan")

    @property
    def delta_ppl_pct(self) -> float:
        return 100.0 * (self.ppl - self.ppl_ref) / self.ppl_ref

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(compression=self.compression, bits_per_element=self.bits_per_element, delta_ppl_pct=self.delta_ppl_pct)
        return d


def _validate(ids: torch.Tensor, prefill: int, tokens: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected token ids of shape [1, n], got {tuple(ids.shape)}")
    if prefill < 1 or tokens < 1:
        raise ValueError(f"prefill ({prefill}) and tokens ({tokens}) must both be >= 1")
    if ids.shape[1] < prefill + tokens:
        raise ValueError(f"need {prefill + tokens} tokens for prefill {prefill} + {tokens}, got {ids.shape[1]}")


@torch.no_grad()
def _stream(model, ids: torch.Tensor, cache: Cache, prefill: int, tokens: int, progress=None) -> torch.Tensor:
    """Log-probabilities [tokens, vocab] of the streaming protocol through `cache`."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    out = []
    logits = model(ids[:, :prefill], **cache_kwargs(model, cache, use_cache=True)).logits[0, -1]
    out.append(torch.log_softmax(logits.float(), -1).cpu())
    for i in range(prefill, prefill + tokens - 1):
        logits = model(ids[:, i : i + 1], **cache_kwargs(model, cache, use_cache=True)).logits[0, -1]
        out.append(torch.log_softmax(logits.float(), -1).cpu())
        if progress is not None:
            progress()
    return torch.stack(out)


def reference_run(model, ids: torch.Tensor, prefill: int, tokens: int, progress=None) -> ReferenceRun:
    """Run the uncompressed model through the same protocol (fp16 method) and keep its log-probs."""
    _validate(ids, prefill, tokens)
    t0 = time.perf_counter()
    cache = make_cache("fp16", model.config)
    logprobs = _stream(model, ids, cache, prefill, tokens, progress)
    return ReferenceRun(logprobs, ids[0, prefill : prefill + tokens].cpu(), time.perf_counter() - t0, cache_nbytes(cache))


def evaluate_kv(
    model,
    ids: torch.Tensor,
    kv: str = "fp16",
    prefill: int = 512,
    tokens: int = 256,
    reference: ReferenceRun | None = None,
    cache_factory: Callable[[], Cache] | None = None,
    progress=None,
    kernels: bool | None = None,
    reuse_reference: bool = False,
) -> EvalResult:
    """Evaluate one KV method (a ``--kv`` spec) with the streaming protocol against the reference.

    `kernels` is :func:`~lowbit.kv.registry.make_cache`'s (None: the model's ``lowbit_kernels`` attribute, set
    False by :func:`lowbit.eval.device.load_for_quality`, else True). ``reuse_reference``: the row *is* the reference
    (plain fp16 on the same, unmodified model), so its run is reused, not repeated (same log-probs, time, bytes)."""
    _validate(ids, prefill, tokens)
    if reuse_reference and (kv != "fp16" or reference is None or cache_factory is not None):
        raise ValueError("reuse_reference needs kv='fp16', a reference run and no cache_factory")
    if reference is None:
        reference = reference_run(model, ids, prefill, tokens, progress)
    if kernels is None:
        kernels = getattr(model, "lowbit_kernels", True)
    if reuse_reference:
        logprobs, seconds, cache = reference.logprobs, reference.seconds, None
    else:
        cache = cache_factory() if cache_factory is not None else make_cache(kv, model.config, model, kernels=kernels)
        t0 = time.perf_counter()
        logprobs = _stream(model, ids, cache, prefill, tokens, progress)
        seconds = time.perf_counter() - t0
    nll = -logprobs.gather(-1, reference.targets[:, None]).squeeze(-1)
    p_ref = reference.logprobs.exp()
    kl = (p_ref * (reference.logprobs - logprobs)).sum(-1).clamp_min(0.0)
    top1 = (logprobs.argmax(-1) == reference.logprobs.argmax(-1)).float().mean().item()
    kv_bytes, kv_bytes_fp16 = reference.kv_bytes if cache is None else cache_nbytes(cache)
    extra = {}
    if cache_factory is None:  # bits at BITS_AT tokens from the registry (exact, or a bound: bytes_exact)
        extra = {"bits_at_4096": bits_per_element_at(kv, model.config), "bytes_exact": is_exact(kv), "family": kv_family(kv)}
    return EvalResult(
        method=kv,
        ppl=math.exp(nll.mean().item()),
        ppl_ref=math.exp(reference.nll.mean().item()),
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        top1_agree=top1,
        kv_bytes=kv_bytes,
        kv_bytes_fp16=kv_bytes_fp16,
        tokens=tokens,
        prefill=prefill,
        tokens_per_s=tokens / seconds,
        extra=extra,
    )
