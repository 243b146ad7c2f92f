"""A variant is what an evaluation row changes: the KV cache, the activation LUTs, the W/A quantization."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from lowbit.spec import SpecError


@dataclass(frozen=True)
class Variant:
    """``kv`` is a ``--kv`` spec; ``lut`` and ``wa`` are optional ``--lut`` / ``--wa`` specs."""

    kv: str = "fp16"
    lut: str | None = None
    wa: str | None = None

    @property
    def label(self) -> str:
        parts = [f"wa={self.wa}"] if self.wa else []
        parts += [f"lut={self.lut}"] if self.lut else []
        if self.kv != "fp16" or not parts:
            parts.append(self.kv)
        return " + ".join(parts)

    def validate(self) -> "Variant":
        """Raise SpecError for any malformed part, before a model is loaded."""
        from lowbit.kv import parse_kv_spec

        parse_kv_spec(self.kv)
        if self.lut:
            from lowbit.lut import parse_lut_spec

            parse_lut_spec(self.lut)
        if self.wa:
            try:
                from lowbit.wa import parse_wa_spec
            except ImportError as exc:  # pragma: no cover - the W/A family ships with lowbit
                raise SpecError(f"--wa is unavailable: {exc}") from exc
            parse_wa_spec(self.wa)
        return self


@contextmanager
def prepared(model, variant: Variant, calib=None) -> Iterator[object]:
    """Yield the model as the variant wants it; the caller's model is left as it was afterwards.

    LUT swaps are undone in place; W/A quantization works on a deep copy (it replaces modules).
    """
    if variant.wa:
        from lowbit.wa import quantize_model

        # the fake-quant path: the same quantized values as the integer path (tested), at float-matmul speed
        work = quantize_model(copy.deepcopy(model), variant.wa, calib=calib, mode="fake")
    else:
        work = model
    applied = 0
    if variant.lut:
        from lowbit.lut import apply_spec

        applied = apply_spec(work, variant.lut)
    try:
        yield work
    finally:
        if applied and work is model:
            from lowbit.lut import restore

            restore(model)
