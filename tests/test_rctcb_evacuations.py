"""The service's evacuation loop: an answer that moves an order on is acted on at once, but never
in an endless burst; an idle region is not polled fast."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from smig.rctcb.evacuations import MAX_BURST, Evacuations


class Orders:
    """Stands for the orchestrator: always one active order, every answer decisive."""

    def __init__(self, active: bool = True) -> None:
        self.listeners: list[Any] = []
        self.rounds: list[float] = []
        self._active = active
        self.answered = asyncio.Event()

    async def resume(self) -> None:
        return None

    def active(self) -> list[str]:
        return ["o"] if self._active else []

    async def run_once(self, *, wait: bool = True) -> None:
        self.rounds.append(time.monotonic())
        self.answered.set()

    async def stop(self) -> None:
        return None


def rounds_in(seconds: float, orders: Orders, poll_s: float) -> list[float]:
    async def go() -> None:
        loop = Evacuations(orders, lambda _: None, poll_interval_s=poll_s)  # type: ignore[arg-type]
        task = asyncio.create_task(loop.run())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(go())
    return orders.rounds


def test_decisive_answers_are_followed_at_once_but_in_bursts_of_at_most_a_few() -> None:
    rounds = rounds_in(0.5, Orders(), poll_s=0.2)
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    immediate = [g < 0.05 for g in gaps]
    assert immediate[:MAX_BURST] == [True] * MAX_BURST, gaps  # the first answers: no waiting
    assert immediate[MAX_BURST] is False and gaps[MAX_BURST] >= 0.19, gaps  # then the poll interval
    longest, run = 0, 0
    for quick in immediate:
        run = run + 1 if quick else 0
        longest = max(longest, run)
    assert longest == MAX_BURST, gaps  # never more than a burst in a row


def test_an_idle_region_is_not_driven() -> None:
    assert rounds_in(0.3, Orders(active=False), poll_s=0.01) == []
