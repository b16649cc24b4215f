"""The gradients a native step plan collected through its C++ lists (plan.py, NOTE (C++ lists)), read
from Python only when something asks for them."""

from __future__ import annotations

from collections.abc import Sequence


class Gradients(Sequence):
    """The gradients a plan collected through its C++ lists, as a read-only sequence.

    NOTE (lazy list): the ops over the plan's own rows take the gradients in C++ (``lists_for``), so a
    SAM step never needs them as Python objects; wrapping each gradient in one costs about as much as an
    op call. The Python list is made the first time something reads the sequence (a policy's
    ``StepContext.grads``, an op over Python lists), once. Read after the pass ended (``release``), it
    raises instead of answering with a later pass's gradients.
    """

    __slots__ = ("_items", "_lists", "_size")

    def __init__(self, lists, size: int) -> None:
        self._lists, self._size, self._items = lists, size, None

    def list(self) -> list:
        """The gradients as a Python list (None where a parameter sitting out the ascent has none)."""
        if self._items is None:
            if self._lists is None:
                raise RuntimeError("the gradients of a pass were read after the pass ended")
            self._items = self._lists.grads()
        return self._items

    def expire(self) -> None:
        self._lists = None

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index):
        return self.list()[index]

    def __iter__(self):
        return iter(self.list())


def as_list(grads: Sequence | None) -> list | None:
    """``grads`` as a Python list (``Gradients`` made one), for code that hands it to torch."""
    return grads.list() if isinstance(grads, Gradients) else grads
