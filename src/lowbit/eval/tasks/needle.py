"""Passkey and key-value retrieval prompts hidden in WikiText filler, and their evaluation under two protocols.

* ``compress="prompt"``: the whole prompt (context and question) is prefilled into the cache, which compresses it
  to its budget; the answer is generated from what is kept.
* ``compress="context"``: only the context (everything before the question) is prefilled and compressed; the cache
  is then frozen (:meth:`lowbit.kv.BudgetCache.freeze`) and the question and the answer are appended outside the
  budget -- the protocol of kvpress, where a compressed context can be asked any question.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from lowbit.eval.data import DEFAULT_TEXT, read_text
from lowbit.generation import build_inputs
from lowbit.kv.hf import cache_kwargs
from lowbit.kv.registry import cache_nbytes, make_cache, parse_kv_spec

TASKS = ("passkey", "kv-retrieval")
PROTOCOLS = ("prompt", "context")
MAX_LENGTH = 8192
_NUMBER = re.compile(r"(?<!\d)\d{5}(?!\d)")

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
KV_INTRO = (
    "Some keys with their values are hidden inside a lot of irrelevant text. "
    "Find them and memorize them. I will ask you for the value of one key."
)


@dataclass
class Sample:
    """One prompt: the text sent to the model (before the chat template), the answer and where the needle is."""

    task: str
    prompt: str
    answer: str
    depth: float
    seed: int
    extra: dict = field(default_factory=dict)
    question: str = ""  # the prompt's last paragraph; the context protocol appends it after compression


@dataclass
class TaskResult:
    """Accuracy of one KV method on one task/length/depth, with the cache bytes (means over samples)."""

    task: str
    kv: str
    length: int
    depth: float
    accuracy: float
    n: int
    correct: int
    kv_bytes: float
    kv_bytes_fp16: float
    prompt_tokens: float
    seconds: float
    compress: str = "prompt"
    score_seconds: float = 0.0  # mean per sample: time the budget cache spent scoring states
    compress_seconds: float = 0.0  # mean per sample: time spent compressing (eviction / merging)
    outputs: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        return self.kv_bytes_fp16 / self.kv_bytes if self.kv_bytes else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression"] = self.compression
        return d


def extract_answer(text: str) -> str | None:
    """The first 5-digit number (not part of a longer number) in `text`, or None."""
    m = _NUMBER.search(text)
    return m.group(0) if m else None


@lru_cache(maxsize=4)
def _filler_ids(tokenizer, path: str) -> tuple[int, ...]:
    """Token ids of the filler text (whole lines of WikiText, headings and blank lines dropped)."""
    text = read_text(path)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")]
    body = " ".join(lines)[:400_000]
    return tuple(tokenizer(body, add_special_tokens=False).input_ids)


def _filler(tokenizer, rng: random.Random, n_tokens: int, path: str) -> list[int]:
    ids = _filler_ids(tokenizer, str(path))
    if n_tokens > len(ids):
        raise ValueError(f"filler text holds only {len(ids)} tokens, {n_tokens} requested")
    start = rng.randrange(0, len(ids) - n_tokens + 1)
    return list(ids[start : start + n_tokens])


def _words(tokenizer, path: str) -> list[str]:
    text = read_text(path)[:200_000]
    return sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{5,9}\b", text)})


def _assemble(tokenizer, rng, length, needles: list[tuple[float, str]], intro, question, path) -> tuple[str, int]:
    """Prompt of about `length` tokens (chat template included): filler with `needles` at their depths."""
    skeleton = f"{intro}\n\n" + " ".join(n for _, n in needles) + f"\n\n{question}"
    overhead = build_inputs(tokenizer, skeleton).shape[1] + 2 * len(needles) + 2
    n_fill = length - overhead
    if n_fill < 16:
        raise ValueError(f"length {length} is too short for this task (needs more than {overhead + 16} tokens)")
    fill = _filler(tokenizer, rng, n_fill, path)
    cuts = sorted((min(n_fill, max(0, round(d * n_fill))), i) for i, (d, _) in enumerate(needles))
    pieces, last = [], 0
    for cut, i in cuts:
        pieces.append(tokenizer.decode(fill[last:cut]).strip())
        pieces.append(needles[i][1])
        last = cut
    pieces.append(tokenizer.decode(fill[last:]).strip())
    body = " ".join(p for p in pieces if p)
    return f"{intro}\n\n{body}\n\n{question}", n_fill


def make_sample(
    tokenizer, task: str, length: int, depth: float = 0.5, seed: int = 0, pairs: int = 4, path: str | Path = DEFAULT_TEXT
) -> Sample:
    """One deterministic sample of `task` with about `length` prompt tokens and the needle at `depth` (0..1)."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}': allowed tasks are {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be a fraction in [0, 1]")
    if not 64 <= length <= MAX_LENGTH:
        raise ValueError(f"length={length} must be between 64 and {MAX_LENGTH} tokens")
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    if task == "passkey":
        key = str(rng.randrange(10000, 100000))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        question = "What is the pass key? Answer with the 5-digit number only."
        prompt, _ = _assemble(tokenizer, rng, length, [(depth, needle)], PASSKEY_INTRO, question, path)
        return Sample(task, prompt, key, depth, seed, question=question)
    if pairs < 1:
        raise ValueError(f"pairs={pairs} must be >= 1")
    words = rng.sample(_words(tokenizer, str(path)), pairs)
    values = [str(v) for v in rng.sample(range(10000, 100000), pairs)]
    depths = [depth] + [rng.random() for _ in range(pairs - 1)]
    needles = [(d, f'The value of the key "{w}" is {v}.') for d, w, v in zip(depths, words, values)]
    question = f'What is the value of the key "{words[0]}"? Answer with the 5-digit number only.'
    prompt, _ = _assemble(tokenizer, rng, length, needles, KV_INTRO, question, path)
    return Sample(task, prompt, values[0], depth, seed, {"key": words[0], "pairs": dict(zip(words, values))}, question)


def prompt_ids(tokenizer, sample: Sample) -> tuple[torch.Tensor, int]:
    """Token ids [1, n] of the sample's chat-formatted prompt and the index where its question starts (everything
    before it is the context; the question and the chat template's tail follow)."""
    ids = build_inputs(tokenizer, sample.prompt)
    if not sample.question:
        raise ValueError("this sample has no question to split off")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False)
    else:
        text = sample.prompt
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc.input_ids != ids[0].tolist():
        raise ValueError("the tokenizer does not reproduce the chat template's ids: cannot split off the question")
    at = text.rindex(sample.question)
    n_context = next(i for i, (a, _) in enumerate(enc.offset_mapping) if a >= at)
    return ids, n_context


@torch.no_grad()
def run_task(
    model,
    tok,
    task: str,
    length: int,
    samples: int,
    kv_spec: str = "fp16",
    depth: float = 0.5,
    seed: int = 0,
    max_new_tokens: int = 16,
    pairs: int = 4,
    path: str | Path = DEFAULT_TEXT,
    progress=None,
    compress: str = "prompt",
) -> TaskResult:
    """Exact-match accuracy of greedy answers over `samples` seeded samples (seeds seed..seed+samples-1), with the
    prompt (``compress="prompt"``) or only the context (``"context"``) compressed; see the module docstring."""
    parse_kv_spec(kv_spec)  # fail early with a SpecError
    check_protocol(compress)
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    device = next(model.parameters()).device
    correct, outputs, answers, nbytes, nbytes16, ntok = 0, [], [], 0.0, 0.0, 0
    spent = {"score": 0.0, "compress": 0.0}
    t0 = time.perf_counter()
    for i in range(samples):
        s = make_sample(tok, task, length, depth, seed + i, pairs, path)
        ids, n_context = prompt_ids(tok, s)
        ids = ids.to(device)
        cache = make_cache(kv_spec, model.config, model)
        if compress == "context":
            model(input_ids=ids[:, :n_context], **cache_kwargs(model, cache, use_cache=True))
            if hasattr(cache, "freeze"):
                cache.freeze()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **cache_kwargs(model, cache),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += extract_answer(text) == s.answer
        outputs.append(text)
        answers.append(s.answer)
        b, b16 = cache_nbytes(cache)
        nbytes, nbytes16, ntok = nbytes + b, nbytes16 + b16, ntok + ids.shape[1]
        for k, v in (cache.seconds() if hasattr(cache, "seconds") else {}).items():
            spent[k] += v
        if progress is not None:
            progress()
    return TaskResult(
        task=task,
        kv=kv_spec,
        length=length,
        depth=depth,
        accuracy=correct / samples,
        n=samples,
        correct=correct,
        kv_bytes=nbytes / samples,
        kv_bytes_fp16=nbytes16 / samples,
        prompt_tokens=ntok / samples,
        seconds=time.perf_counter() - t0,
        outputs=outputs,
        answers=answers,
        compress=compress,
        score_seconds=spent["score"] / samples,
        compress_seconds=spent["compress"] / samples,
    )


def check_protocol(compress: str) -> None:
    if compress not in PROTOCOLS:
        raise ValueError(f"compress={compress!r}: allowed protocols are {', '.join(PROTOCOLS)}")
