"""A named registry of input changes for "each input changes the key" tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Change = Callable[[T], dict[str, object]]


class Changes(Generic[T]):
    """``@changes("name")`` registers a function that alters a fixture and returns options."""

    def __init__(self) -> None:
        self.by_name: dict[str, Change[T]] = {}

    def __call__(self, name: str) -> Callable[[Change[T]], Change[T]]:
        def register(fn: Change[T]) -> Change[T]:
            self.by_name[name] = fn
            return fn

        return register

    def names(self) -> list[str]:
        return sorted(self.by_name)
