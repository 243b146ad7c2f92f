"""Per-request sampling (greedy, temperature, top-p, seeded) and incremental text with stop strings."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks for. ``temperature == 0`` is greedy (argmax, as ``lowbit generate``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device="cpu").manual_seed(int(seed) & ((1 << 63) - 1))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] logits row.

    Greedy: argmax. Otherwise, in float64: z = (logits - max) / temperature, which is finite (<= 0, the
    top token at 0) for any temperature > 0, however small; p = softmax(z), cut to the top-p nucleus; then the
    exponential race: one Exp(1) draw E_i per vocabulary entry, token = argmax over the nucleus of p_i / E_i,
    which is distributed as p (restricted to the nucleus). Every call draws exactly ``vocab`` numbers, keyed
    by token id rather than by rank, so a request's random stream depends only on its seed and its token
    count, and a perturbation of the logits changes the token only where it moves a decision boundary (the
    top-p cut, or a near-tie in the race) -- never by reordering tokens of nearly equal probability.
    """
    if params.greedy:
        return int(torch.argmax(logits.float()))
    z = logits.detach().to("cpu", torch.float64)
    z = (z - z.max()) / params.temperature
    probs = torch.softmax(z, dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    if params.top_p < 1.0:
        # a token below (1 - top_p) / vocab has more than top_p of the mass before it: only the rest needs sorting
        cand = torch.nonzero(probs >= (1.0 - params.top_p) / probs.numel()).squeeze(1)
        sorted_p, order = torch.sort(probs[cand], descending=True, stable=True)
        keep_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p  # the smallest prefix reaching top_p
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[cand[order[keep_sorted]]] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return int(torch.argmax(probs / noise.clamp_(min=1e-300)))


class TextTracker:
    """Turns generated token ids into text deltas, holding back what could still change.

    Text is the decode of all generated ids (special tokens skipped, as ``generate_text``), so the
    concatenated deltas equal the non-streamed text. A trailing U+FFFD (an incomplete UTF-8
    sequence) and any suffix that could be the start of a stop string are held back until resolved.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped_at: int | None = None

    def _held_back(self, text: str) -> int:
        hold = 0
        if text.endswith("\ufffd"):
            hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def add(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to send (may be empty)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = min(hits)
                return self.flush()
        end = len(self.text) - self._held_back(self.text)
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def flush(self) -> str:
        """Everything not yet sent, up to a stop string when one was hit."""
        end = self.stopped_at if self.stopped_at is not None else len(self.text)
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    @property
    def final_text(self) -> str:
        return self.text[: self.stopped_at] if self.stopped_at is not None else self.text
