"""The context-manager shape every test process and server shares: leaving the block stops it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StopOnExit:
    """``with thing:`` returns it as it is (subclasses that start on entry override ``__enter__``)."""

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
