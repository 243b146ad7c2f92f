"""Evaluation text: WikiText-2 raw test split bundled in the repository (CC BY-SA 3.0, see its README)."""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "data" / "wikitext-2-raw" / "wiki.test.raw"


def read_text(path: str | Path = DEFAULT_TEXT) -> str:
    """Read a text file as bytes and decode UTF-8, so line endings never change tokenization."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text {path} not found: give --text PATH to a UTF-8 text file")
    return path.read_bytes().decode("utf-8")


def load_tokens(tokenizer, path: str | Path = DEFAULT_TEXT, n_tokens: int | None = None, offset: int = 0) -> torch.Tensor:
    """The first `n_tokens` token ids (after `offset`) of the text, as a [1, n] LongTensor.

    Only as much text as needed is tokenized (about 4 characters per token, grown if short).
    """
    text = read_text(path)
    need = None if n_tokens is None else offset + n_tokens
    chars = len(text) if need is None else min(len(text), 6 * need + 1000)
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False).input_ids
        if need is None or ids.shape[1] >= need or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if need is not None and ids.shape[1] < need:
        raise ValueError(f"{path} holds only {ids.shape[1]} tokens, fewer than the {need} requested")
    return ids[:, offset:need]


def calibration_tokens(tokenizer, path: str | Path = DEFAULT_TEXT, n: int = 8, length: int = 256, seed: int = 0) -> torch.Tensor:
    """`n` seeded windows of `length` tokens from the second half of the text: disjoint from the
    evaluation tokens, which are taken from its start. Used by W/A methods that calibrate (FMPQ)."""
    from lowbit.wa import calibration_ids

    text = read_text(path)
    half = text[len(text) // 2 :]
    ids = tokenizer(half[: min(len(half), 8 * n * length + 4000)], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return calibration_ids(ids, n=n, length=length, seed=seed)
