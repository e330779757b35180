"""What every pool shares: its lifecycle states and ``async with`` behaviour."""

from __future__ import annotations

import enum
from types import TracebackType
from typing import TypeVar

from ._errors import PoolClosedError


class PoolState(enum.Enum):
    """Lifecycle of a pool: OPEN -> CLOSING -> CLOSED."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_PoolT = TypeVar("_PoolT", bound="PoolContext")


class PoolContext:
    """``async with pool:`` for every pool: refuses a pool that is not open, closes it on exit."""

    _state: PoolState

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _PoolT) -> _PoolT:
        if self._state is not PoolState.OPEN:
            raise PoolClosedError(
                f"{self!r} cannot be entered because it is {self._state.value}; "
                f"create a new {type(self).__name__} instead."
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
