"""Perplexity helpers for comparing weight/activation quantizers (full sequences, no KV cache).

Run ``python -m lowbit.eval.wa [spec ...]`` for the table of docs/FMPQ.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.data import DEFAULT_TEXT, read_text


def wikitext_ids(tokenizer, path: str | Path = DEFAULT_TEXT) -> torch.Tensor:
    """The whole evaluation text (bundled WikiText-2 test by default) as a 1-D LongTensor of ids."""
    return torch.tensor(tokenizer(read_text(path), add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def full_ppl(model: nn.Module, ids: torch.Tensor, window: int = 1024) -> float:
    """Perplexity over non-overlapping windows of `window` tokens (each scored independently, no cache).

    Every token but the first of each window is predicted from the tokens before it in its window;
    a last partial window of at least 2 tokens is included. Returns exp(mean NLL over predictions).
    """
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window]
        if chunk.numel() < 2:
            break
        x = chunk.unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(nll / count)


TABLE_SPECS = (
    "fp",
    "w8a8",
    "w4a16",
    "w4a4",
    "fmpq:a=4,int8_frac=0.1",
    "fmpq:a=8",
    "fmpq:a=4,int8_frac=0",
    "fmpq:a=4,int8_frac=0.05",
    "fmpq:a=4,int8_frac=0.25",
    "w4a4:block=64,group=64",
    "fmpq:a=4,int8_frac=0.1,block=64,group=64",
)


def compare(
    specs=TABLE_SPECS,
    model_name: str = "smollm2",
    n_eval: int = 4096,
    window: int = 1024,
    calib_n: int = 8,
    calib_len: int = 256,
    seed: int = 0,
    mode: str = "fake",
    threads: int | None = None,
) -> list[dict]:
    """Perplexity and model bytes for each spec (``"fp"``: unquantized) on the first `n_eval` WikiText-2
    test tokens; calibration uses `calib_n` windows of `calib_len` tokens drawn (seeded) from the second
    half of the file, disjoint from the evaluation tokens. One calibration pass serves every spec."""
    import lowbit
    from lowbit.wa.model import calibration_ids

    if threads:
        torch.set_num_threads(threads)
    base, tok = lowbit.load_model(model_name)
    ids = wikitext_ids(tok)
    calib = calibration_ids(ids[ids.numel() // 2 :], n=calib_n, length=calib_len, seed=seed)
    rows = wa_rows(base, specs, ids[:n_eval], calib, window=window, mode=mode)
    for row in rows:
        print(f"{row['spec']:32s} ppl {row['ppl']:9.3f}  bytes {row['bytes']:,}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def wa_rows(base: nn.Module, specs, eval_ids: torch.Tensor, calib: torch.Tensor, window: int = 1024,
            mode: str = "fake", progress=None) -> list[dict]:
    """Full-sequence perplexity and model bytes of `base` quantized with each spec (``"fp"``: as it is).

    One calibration pass over `calib` serves every spec; `base` itself is never modified.
    """
    import copy
    import time

    from lowbit.wa.model import collect_channel_stats, fp16_nbytes, model_nbytes, quantize_model, select_linears

    stats = collect_channel_stats(base, select_linears(base), calib)
    rows = []
    for spec in specs:
        t0 = time.time()
        if spec == "fp":
            model, nbytes = base, fp16_nbytes(base)
        else:
            model = quantize_model(copy.deepcopy(base), spec, stats=stats, mode=mode)
            nbytes = model_nbytes(model)
        ppl = full_ppl(model, eval_ids, window)
        rows.append({"spec": spec, "ppl": ppl, "bytes": nbytes, "seconds": time.time() - t0})
        del model
        if progress is not None:
            progress()
    return rows


if __name__ == "__main__":  # python -m lowbit.eval.wa [spec ...]
    import sys

    compare(tuple(sys.argv[1:]) or TABLE_SPECS)
