"""One registry for every kind of plugin: baseline methods, index kinds, decoder shapes, router kinds.

A ``Registry[T]`` maps a kind's name to what the kind is (an object or a class):

    SHAPES: Registry[type[DecoderShape]] = Registry("decoder shape")

    @SHAPES.register               # a decorator (the name is the item's ``name``) ...
    class ForkShape(DecoderShape): ...
    METHODS.register(Lora())       # ... or a call

    SHAPES.get("fork")             # one MemdecError line naming the known kinds where there is none
    SHAPES.names()                 # in the order they were registered

A kind lives in its own module and registers itself at its end; ``discover`` imports every module
of a package (``memdec.baselines``, ``memdec.index``), so a new kind is one new module and its test.
What a kind writes into a record (``memdec.json``'s ``decoder``, ``router.json``) is checked by the kind
itself: it registers its record check where the format's reader looks it up (``memdec.checkpoint``'s
``DECODER_RECORDS`` and ``ROUTER_KINDS`` are registries too), so no module compares kind names.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from .errors import MemdecError

T = TypeVar("T")

UNKNOWN = "unknown {what} {name!r}; choose one of: {names}"  # the default line for a name not registered


def _shown(value) -> str:
    """A value as JSON where it is one (``"mlp"``), else its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class Registry(Generic[T]):
    """Named kinds of one sort, in the order they were registered.

    what: the sort's name in messages ("decoder shape"); error: the MemdecError subclass ``get`` raises;
    unknown: ``get``'s line for an unregistered name, a format string with ``{what}``, ``{name}``,
    ``{names}`` (the registered names, comma-separated), ``{shown}`` and ``{shown_names}`` (the same as
    JSON) and ``{where}``; reserved: names no kind may take (``auto``); name_of: a kind's name (default:
    its ``name`` attribute); order: a sort key of the kinds (``names``, ``values``, ``items`` and
    ``unknown``'s list go by it; default: the order they were registered)."""

    def __init__(self, what: str, *, error: type[MemdecError] = MemdecError, unknown: str = UNKNOWN,
                 reserved: Iterable[str] = (), name_of: Callable[[T], str] | None = None,
                 order: Callable[[T], Any] | None = None):
        self.what = what
        self.error = error
        self.unknown = unknown
        self.reserved = tuple(reserved)
        self._name_of = name_of or (lambda item: item.name)
        self._order = order
        self._items: dict[str, T] = {}

    def register(self, item: T, *, name: str | None = None) -> T:
        """Add ``item`` under ``name`` (default: its own name) and return it: a call or a class decorator.
        ValueError (a programming error, not a user's) where the name is empty, reserved or taken."""
        name = self._name_of(item) if name is None else name
        if not isinstance(name, str) or not name or name in self.reserved:
            raise ValueError(f"{self.what} name {name!r} is empty or reserved ({', '.join(self.reserved) or 'none'})")
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered already")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove the kind ``name`` (a test's own kind, once the test is done); nothing where there is none."""
        self._items.pop(name, None)

    def get(self, name, where: str | None = None) -> T:
        """The kind called ``name``; else one ``error`` line (``unknown``), after ``where: `` if given."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        raise self.error(self.unknown_message(name, where))

    def unknown_message(self, name, where: str | None = None) -> str:
        """The line ``get`` raises for ``name``."""
        names = self.names()
        line = self.unknown.format(what=self.what, name=name, names=", ".join(names), shown=_shown(name),
                                   shown_names=", ".join(_shown(n) for n in names), where=where)
        return line if where is None or "{where}" in self.unknown else f"{where}: {line}"

    def find(self, name) -> T | None:
        """The kind called ``name``, or None."""
        return self._items.get(name) if isinstance(name, str) else None

    def items(self) -> list[tuple[str, T]]:
        """(name, kind) pairs, in ``order`` (default: the order they were registered)."""
        pairs = list(self._items.items())
        return pairs if self._order is None else sorted(pairs, key=lambda pair: self._order(pair[1]))

    def names(self) -> tuple[str, ...]:
        """The registered names, in ``order``."""
        return tuple(name for name, _ in self.items())

    def values(self) -> list[T]:
        """The registered kinds, in ``order``."""
        return [item for _, item in self.items()]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def discover(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__name__``; ``path``: its ``__path__``) but those in
    ``skip``, in name order: each kind's module registers its kind as it is imported. Returns the
    modules' names."""
    skipped = set(skip)
    found = sorted(m.name for m in pkgutil.iter_modules(list(path)) if m.name not in skipped)
    for name in found:
        importlib.import_module(f"{package}.{name}")
    return found
