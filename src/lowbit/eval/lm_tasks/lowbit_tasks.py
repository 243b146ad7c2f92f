"""Offline lm-eval tasks built from the bundled WikiText-2 test file (no download, seeded, deterministic).

* ``lowbit_wikitext``: word perplexity of whole articles (``loglikelihood_rolling``), as lm-eval's ``wikitext``.
* ``lowbit_cloze_mc``: multiple choice -- a sentence without its last word, the true word and three last words of
  other sentences; few-shot examples come from the second half of the file, questions from the first.
* ``lowbit_cloze_gen``: the same sentences, the last word generated (``generate_until``) and matched exactly.

lm-eval calls the builders with the task's ``metadata`` and ``dataset_kwargs`` (and the model_args), so they take
``**_`` for whatever else arrives.
"""

from __future__ import annotations

import random
import re

from lowbit.eval.data import DEFAULT_TEXT, read_text

_HEADING = re.compile(r"^ = [^=].* = $")
_WORD = re.compile(r"^[A-Za-z]{4,}$")


def _lines(path=DEFAULT_TEXT) -> list[str]:
    return read_text(path).replace("\r\n", "\n").split("\n")


def articles(path=DEFAULT_TEXT) -> list[str]:
    """The file split at its top-level headings (`` = Title = ``), one string per article."""
    docs, cur = [], []
    for line in _lines(path):
        if _HEADING.match(line) and any(x.strip() for x in cur):
            docs.append("\n".join(cur).strip("\n"))
            cur = []
        cur.append(line)
    if any(x.strip() for x in cur):
        docs.append("\n".join(cur).strip("\n"))
    return docs


def _dataset(splits: dict):
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


def wikitext_docs(lowbit_max_words: int | None = None, **_):
    """Articles as ``{"page": text}`` in a ``test`` split; `lowbit_max_words` truncates each (word counts follow)."""
    docs = articles()
    if lowbit_max_words:
        docs = [" ".join(d.split(" ")[: int(lowbit_max_words)]) for d in docs]
    return _dataset({"test": [{"page": d} for d in docs]})


def wikitext_results(doc: dict, results) -> dict:
    """Word/byte perplexity and bits per byte, counted on the raw article (lm-eval's ``wikitext`` convention)."""
    (logprob,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (logprob, words), "byte_perplexity": (logprob, nbytes), "bits_per_byte": (logprob, nbytes)}


def _sentences(lines: list[str]) -> list[tuple[str, str]]:
    """(sentence without its last word, last word) for plain sentences of 10..40 words ending in a word."""
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in line.split(" . "):
            words = sent.split(" ")
            if 10 <= len(words) <= 40 and _WORD.match(words[-1]) and "@" not in sent:
                out.append((" ".join(words[:-1]), words[-1]))
    return out


def cloze_items(seed: int = 1234, per_split: int = 200) -> dict[str, list[dict]]:
    """``train`` (second half of the file) and ``test`` (first half) cloze items with 4 choices each."""
    lines = _lines()
    half = len(lines) // 2
    rng = random.Random(seed)
    splits = {}
    for name, part in (("test", lines[:half]), ("train", lines[half:])):
        sents = _sentences(part)
        pool = sorted({w for _, w in sents})
        rows = []
        for context, answer in rng.sample(sents, min(per_split, len(sents))):
            wrong = rng.sample([w for w in pool if w.lower() != answer.lower()], 3)
            gold = rng.randrange(4)
            choices = wrong[:gold] + [answer] + wrong[gold:]
            rows.append({"context": context, "choices": choices, "gold": gold, "answer": answer})
        splits[name] = rows
    return splits


def cloze_mc(**_):
    return _dataset(cloze_items())


def cloze_gen(**_):
    return _dataset(cloze_items())
