"""Swap a model's activation modules for LUT evaluations."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.lut.functions import FUNCTIONS
from lowbit.lut.table import LutTable

APPLICABLE = tuple(name for name, f in FUNCTIONS.items() if f.modules)


class LutActivation(nn.Module):
    """An activation module evaluating a :class:`LutTable` (float in -> int8 -> integer program -> float out).

    The lookup constants live in non-persistent buffers, so ``.to(device)`` moves them and the
    model's ``state_dict`` is unchanged. ``outside`` is passed to :meth:`LutTable.__call__`.
    """

    def __init__(self, table: LutTable, outside: str = "asymptote", original: nn.Module | None = None):
        super().__init__()
        if outside not in ("asymptote", "saturate"):
            raise ValueError(f"outside must be 'asymptote' or 'saturate', got {outside!r}")
        self.table = table
        self.outside = outside
        self._original = [original]  # a list, so the original is not registered as a submodule
        m_full, c_full = table._full_coefs()
        self.register_buffer("bounds", torch.tensor(table.bounds, dtype=torch.int64), persistent=False)
        self.register_buffer("slopes", torch.tensor(m_full, dtype=torch.int64), persistent=False)
        self.register_buffer("intercepts", torch.tensor(c_full, dtype=torch.int64), persistent=False)

    @property
    def original(self) -> nn.Module | None:
        return self._original[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x, outside=self.outside, consts=(self.bounds, self.slopes, self.intercepts))

    def extra_repr(self) -> str:
        t = self.table
        return f"fn={t.fn}, segments={t.segments}, range=[{t.lo:g}, {t.hi:g}], in_bits={t.in_bits}, coef_bits={t.coef_bits}"


def _matches(module: nn.Module, class_names: set[str]) -> bool:
    return any(cls.__name__ in class_names for cls in type(module).__mro__)


def _device_of(module: nn.Module, fallback: nn.Module) -> torch.device:
    for source in (module, fallback):
        for tensor in source.parameters():
            return tensor.device
        for tensor in source.buffers():
            return tensor.device
    return torch.device("cpu")


def apply(model: nn.Module, tables: dict[str, LutTable], attrs: tuple[str, ...] = ("act_fn",),
          outside: str = "asymptote") -> int:
    """Replace every ``<module>.<attr>`` (attr in `attrs`, default ``act_fn``) whose class implements one of
    the named functions by a :class:`LutActivation` of its table; returns how many were replaced.

    ``tables`` maps a function name (one of :data:`APPLICABLE`: silu, gelu, hswish, sigmoid, tanh) to a table.
    SiLU matches ``nn.SiLU`` and transformers' ``SiLUActivation``; GELU matches ``nn.GELU`` and the
    transformers GELU classes, tanh approximations included. Raises ValueError if nothing matched.
    """
    if not tables:
        raise ValueError(f"no tables given: pass e.g. {{'silu': table}}; allowed names are {', '.join(APPLICABLE)}")
    wanted: dict[str, tuple[set[str], LutTable]] = {}
    for name, table in tables.items():
        key = name.strip().lower()
        if key not in APPLICABLE:
            raise ValueError(f"cannot apply a LUT for '{name}' to model activations: allowed names are {', '.join(APPLICABLE)}")
        if not isinstance(table, LutTable):
            raise ValueError(f"the value for '{name}' must be a LutTable, got {type(table).__name__}")
        if table.fn in FUNCTIONS and table.fn != key:
            raise ValueError(f"the table given for '{key}' approximates '{table.fn}': fit a '{key}' table")
        wanted[key] = (set(FUNCTIONS[key].modules), table)
    count = 0
    seen: set[str] = set()
    for _, module in list(model.named_modules()):
        for attr in attrs:
            child = module._modules.get(attr) if hasattr(module, "_modules") else None
            if child is None or isinstance(child, LutActivation):
                continue
            seen.add(type(child).__name__)
            for classes, table in wanted.values():
                if _matches(child, classes):
                    lut = LutActivation(table, outside=outside, original=child).to(_device_of(child, module))
                    setattr(module, attr, lut)
                    count += 1
                    break
    if count == 0:
        looked = sorted(c for classes, _ in wanted.values() for c in classes)
        raise ValueError(
            f"no activation matched: looked for attributes {list(attrs)} of class {', '.join(looked)}; "
            f"found {', '.join(sorted(seen)) or 'no such attributes'}"
        )
    return count


def restore(model: nn.Module) -> int:
    """Put back the original activations replaced by :func:`apply`; returns how many were restored."""
    count = 0
    for _, module in list(model.named_modules()):
        for attr, child in list(getattr(module, "_modules", {}).items()):
            if isinstance(child, LutActivation) and child.original is not None:
                setattr(module, attr, child.original)
                count += 1
    return count
