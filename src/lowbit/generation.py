"""Text generation with a lowbit cache, for the CLI and the server."""

from __future__ import annotations

from threading import Thread
from typing import Iterator

import torch

from lowbit.kv.hf import cache_kwargs
from lowbit.kv.registry import make_cache


def build_inputs(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids [1, n] for a prompt; the chat template is applied when asked and available."""
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate_text(
    model, tokenizer, prompt: str, kv: str = "fp16", max_new_tokens: int = 64, chat: bool = True, stream: bool = False
) -> Iterator[str] | str:
    """Greedy generation with the given KV spec; a string, or an iterator of text pieces when `stream`."""
    from transformers import TextIteratorStreamer

    ids = build_inputs(tokenizer, prompt, chat).to(next(model.parameters()).device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **cache_kwargs(model, make_cache(kv, model.config, model)),
        pad_token_id=tokenizer.pad_token_id,
    )
    if not stream:
        out = model.generate(**kwargs)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer}, daemon=True)
    thread.start()

    def pieces() -> Iterator[str]:
        yield from streamer
        thread.join()

    return pieces()
