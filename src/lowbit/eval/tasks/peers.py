"""Peer KV-compression methods on lowbit's retrieval tasks: NVIDIA's kvpress presses, same prompts, same answer check.

A press compresses the cache while it prefills (``with press(model): model(...)``), then the answer is decoded
greedily with explicit position ids, as kvpress's own pipeline does:

* ``compress="prompt"``: the whole prompt is prefilled under the press; decoding starts from its last logits.
* ``compress="context"``: the context is prefilled under the press; the question and the answer follow outside it.

lowbit's ``budget`` (fraction kept) is kvpress's ``compression_ratio = 1 - budget`` (fraction removed). kvpress is
an optional extra: it pins ``transformers<5.3``, so install it without its dependencies (README, "KV budgets").
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import contextmanager

import torch

from lowbit.eval.tasks.needle import TaskResult, check_protocol, extract_answer, make_sample, prompt_ids
from lowbit.kv.hf import cache_kwargs

# name -> (kvpress class, extra constructor arguments, attention implementation it needs)
PRESSES = {
    "tova": ("TOVAPress", {}, None),
    "observed": ("ObservedAttentionPress", {}, "eager"),  # kvpress's H2O: attention of every prefill query
    "snapkv": ("SnapKVPress", {}, None),
    "streaming": ("StreamingLLMPress", {}, None),
    "knorm": ("KnormPress", {}, None),
    "expected": ("ExpectedAttentionPress", {}, None),
}
DEFAULT_PRESSES = ("tova", "observed", "snapkv", "streaming")


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def make_press(name: str, budget: float):
    """The kvpress press `name` (a key of :data:`PRESSES`) keeping the fraction `budget` of the tokens."""
    if name not in PRESSES:
        raise ValueError(f"unknown kvpress press '{name}': allowed are {', '.join(PRESSES)}")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must be a fraction in (0, 1]")
    if not kvpress_available():
        raise ValueError("kvpress is not installed: pip install --no-deps kvpress==0.5.5 plus the 'kvpress' extra")
    import kvpress

    cls, kwargs, _ = PRESSES[name]
    return getattr(kvpress, cls)(compression_ratio=1.0 - budget, **kwargs)


@contextmanager
def _attention(model, implementation: str | None):
    """Switch `model` to an attention implementation for the block (restored after)."""
    old = getattr(model.config, "_attn_implementation", None)
    if implementation is None or implementation == old:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@torch.no_grad()
def greedy_after(model, cache, ids: torch.Tensor, start: int, first_logits: torch.Tensor | None, max_new_tokens: int, eos) -> list[int]:
    """Feed ``ids[:, start:]`` (if any) at their true positions into a (compressed) cache, then decode greedily."""
    pos = start
    logits = first_logits
    if start < ids.shape[1]:
        q = ids[:, start:]
        position_ids = torch.arange(start, ids.shape[1], device=ids.device)[None]
        logits = model(input_ids=q, **cache_kwargs(model, cache, position_ids=position_ids, use_cache=True)).logits[:, -1]
        pos = ids.shape[1]
    out = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        if nxt in eos or len(out) == max_new_tokens:
            break
        step = torch.tensor([[nxt]], device=ids.device)
        logits = model(input_ids=step, **cache_kwargs(model, cache, position_ids=torch.tensor([[pos]], device=ids.device), use_cache=True)).logits[:, -1]
        pos += 1
    return out


@torch.no_grad()
def run_press_task(
    model, tok, task: str, length: int, samples: int, press: str, budget: float, compress: str = "prompt",
    depth: float = 0.5, seed: int = 0, max_new_tokens: int = 16, progress=None,
) -> TaskResult:
    """:func:`~lowbit.eval.tasks.run_task` for a kvpress press (same samples, same exact-match check)."""
    from transformers import DynamicCache

    from lowbit.eval.kvpress_interop import kvpress_compat

    check_protocol(compress)
    p = make_press(press, budget)
    _, _, implementation = PRESSES[press]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    device = next(model.parameters()).device
    correct, outputs, answers, nbytes, nbytes16, ntok = 0, [], [], 0.0, 0.0, 0
    t0 = time.perf_counter()
    for i in range(samples):
        s = make_sample(tok, task, length, depth, seed + i)
        ids, n_context = prompt_ids(tok, s)
        ids = ids.to(device)
        n_pre = ids.shape[1] if compress == "prompt" else n_context
        cache = DynamicCache(config=model.config)
        with _attention(model, implementation):
            with kvpress_compat(model), p(model):
                logits = model(input_ids=ids[:, :n_pre], **cache_kwargs(model, cache, use_cache=True)).logits[:, -1]
        generated = greedy_after(model, cache, ids, n_pre, logits, max_new_tokens, eos)
        text = tok.decode(generated, skip_special_tokens=True)
        correct += extract_answer(text) == s.answer
        outputs.append(text)
        answers.append(s.answer)
        kept = sum(2 * layer.keys.numel() for layer in cache.layers)  # K and V, 2 bytes per element
        per_token = sum(2 * layer.keys[..., :1, :].numel() for layer in cache.layers)
        nbytes += 2 * kept
        nbytes16 += 2 * per_token * (ids.shape[1] + len(generated) - 1)
        ntok += ids.shape[1]
        if progress is not None:
            progress()
    return TaskResult(
        task=task, kv=f"kvpress:{press}:budget={budget}", length=length, depth=depth, accuracy=correct / samples,
        n=samples, correct=correct, kv_bytes=nbytes / samples, kv_bytes_fp16=nbytes16 / samples, prompt_tokens=ntok / samples,
        seconds=time.perf_counter() - t0, outputs=outputs, answers=answers, compress=compress,
    )


def press_rows(model, tok, task: str, length: int, samples: int, budgets, presses, compress: str = "prompt", progress=None) -> list[dict]:
    """Rows (``method`` ``kvpress:<press>``, ``budget``, ``accuracy``, ...) for lowbit's budget table and plot."""
    rows = []
    for press in presses:
        for b in budgets:
            r = run_press_task(model, tok, task, length, samples, press, b, compress, progress=progress)
            rows.append({"method": f"kvpress:{press}", "budget": b, "kv": r.kv, "accuracy": r.accuracy, "correct": r.correct,
                         "n": r.n, "kv_bytes": r.kv_bytes, "compress": compress})
    return rows
