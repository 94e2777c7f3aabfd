"""A slice of an append-only list, held without copying it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class ListPrefix(Sequence[T]):
    """`items[start:stop]` of a list that only ever grows at its end, as a read-only sequence.

    Made in O(1), it keeps showing the same items however much the list grows afterwards. Streamed
    outputs hold their cumulative token ids and logprobs this way: copying them at every step cost
    O(n) per token, O(n^2) over a request. Slices and iteration copy just what they return. It is
    read-only and not a list: `list(prefix)` for one (to concatenate, or for `json.dumps`).
    """

    __slots__ = ("_items", "_start", "_stop")

    def __init__(self, items: list[T], start: int = 0, stop: int | None = None) -> None:
        stop = len(items) if stop is None else stop
        if not 0 <= start <= stop <= len(items):
            raise ValueError(f"ListPrefix({len(items)} items, start={start}, stop={stop}): need 0 <= start <= stop <= "
                             "len(items)")
        self._items = items
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step < 0:  # rare; index.indices' stop may be -1, which a list slice reads from the end
                return self._items[self._start : self._stop][index]
            return self._items[self._start + start : self._start + max(stop, start) : step]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("ListPrefix index out of range")
        return self._items[self._start + index]

    def __iter__(self) -> Iterator[T]:
        return iter(self._items[self._start : self._stop])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ListPrefix, list)):  # as a list: never equal to a tuple
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # like a list: equal to lists, so not hashable

    def __reduce__(self):
        return ListPrefix, (list(self),)  # pickled or deep-copied: its own items only, not the whole list

    def __repr__(self) -> str:
        return f"ListPrefix({list(self)!r})"
