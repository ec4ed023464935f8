"""Name → object registries filled by a decorator where each object is defined (one line per kind).

The config layer keeps the registries of option classes (`method.adapter` and `method.gradient` kinds); the
adapters and gradient packages keep registries of builders with the same `Registry`. How to add a kind:
docs/config.md, "Adding an adapter kind or a gradient rule".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from loralab.errors import ConfigError, unknown

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of names to objects: `register(name)` adds one, `lookup` refuses an unknown name."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding `obj` under `name`; a second, different object under a taken name is a ValueError."""

        def add(obj: T) -> T:
            known = self._items.get(name)
            if known is not None and qualified(known) != qualified(obj):
                raise ValueError(f"{self.what} '{name}' is already registered ({qualified(known)})")
            self._items[name] = obj
            return obj

        return add

    def lookup(self, name: str, where: str) -> T:
        """The object registered under `name`, or a ConfigError naming `where` with a did-you-mean."""
        if not isinstance(name, str) or name not in self._items:
            raise ConfigError(f"{where}: " + unknown(self.what, str(name), self._items))
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def qualified(obj: object) -> str:
    """`module.qualname` of a class or function: a module imported twice registers the same name again."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


ADAPTER_OPTIONS: Registry[type] = Registry("adapter kind")
GRADIENT_OPTIONS: Registry[type] = Registry("gradient kind")


def adapter_options(cls: type) -> type:
    """Class decorator: register a `method.adapter` options dataclass under its `kind` field's default."""
    return ADAPTER_OPTIONS.register(cls.kind)(cls)


def rule_options(cls: type) -> type:
    """Class decorator: register a `method.gradient` options dataclass under its `kind` field's default."""
    return GRADIENT_OPTIONS.register(cls.kind)(cls)
