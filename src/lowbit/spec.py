"""One parser for every method spec: ``name:key=value,key=value`` (``+`` joins composed specs).

Each method family (KV caches, weight/activation quantizers, LUTs) keeps a registry of
:class:`MethodSpec`; :func:`parse_spec` validates a string against it and returns typed options,
with errors that name what was wrong and list what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class SpecError(ValueError):
    """A method spec string is malformed, names an unknown method or key, or has a bad value."""


@dataclass(frozen=True)
class Param:
    """One option of a method: its type, default, optional aliases and a validity check."""

    type: type
    default: Any
    aliases: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # human-readable description of valid values, used in errors
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, options and a short description."""

    name: str
    params: dict[str, Param] = field(default_factory=dict)
    help: str = ""

    def lookup(self, key: str) -> str:
        for canonical, param in self.params.items():
            if key == canonical or key in param.aliases:
                return canonical
        names = ", ".join(f"{k}" + (f" (or {'/'.join(p.aliases)})" if p.aliases else "") for k, p in self.params.items())
        raise SpecError(f"unknown option '{key}' for method '{self.name}': allowed options are {names or 'none'}")


@dataclass(frozen=True)
class ParsedSpec:
    """A validated spec: method name and every option (defaults filled in)."""

    name: str
    options: dict[str, Any]
    text: str
    given: frozenset[str] = frozenset()  # the options the text set explicitly (the rest are defaults)

    def __str__(self) -> str:
        return self.text


def _convert(method: MethodSpec, key: str, raw: str) -> Any:
    param = method.params[key]
    try:
        if param.type is bool:
            lowered = raw.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            value = lowered in ("1", "true", "yes")
        else:
            value = param.type(raw)
    except ValueError:
        raise SpecError(
            f"option '{key}' of '{method.name}' must be {param.type.__name__}"
            + (f" ({param.allowed})" if param.allowed else "")
            + f", got '{raw}'"
        ) from None
    if param.check is not None and not param.check(value):
        raise SpecError(f"option '{key}' of '{method.name}' is {value!r}: allowed values are {param.allowed}")
    return value


def parse_one(text: str, registry: dict[str, MethodSpec], family: str = "method") -> ParsedSpec:
    """Parse a single ``name:key=value,...`` spec against `registry`."""
    text = text.strip()
    if not text:
        raise SpecError(f"empty {family} spec: allowed methods are {', '.join(registry)}")
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in registry:
        raise SpecError(f"unknown {family} '{name}': allowed methods are {', '.join(registry)}")
    method = registry[name]
    options = {key: param.default for key, param in method.params.items()}
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not raw.strip():
            raise SpecError(f"malformed option '{item}' in '{text}': write key=value, e.g. '{name}:{next(iter(method.params), 'key')}=...'")
        canonical = method.lookup(key.strip().lower())
        if canonical in seen:
            raise SpecError(f"option '{canonical}' given twice in '{text}'")
        seen.add(canonical)
        options[canonical] = _convert(method, canonical, raw.strip())
    return ParsedSpec(name, options, text, frozenset(seen))


def parse_spec(text: str, registry: dict[str, MethodSpec], family: str = "method") -> list[ParsedSpec]:
    """Parse a possibly composed spec (``a:...+b:...``) into its parts, in order."""
    return [parse_one(part, registry, family) for part in text.split("+")]
