"""Effects as a live stream: the broadcaster behind ``GET /v1/events`` (server-sent events).

Every effect the app's calls produce (and whatever the service loop publishes) goes to every
subscriber. Each subscriber has its own bounded queue: a subscriber that does not keep up is
dropped (its stream ends, it may reconnect and re-read the audit log), so one slow reader can
never hold up the decisions that publish. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from smig.rctcb.api_models import effect_out
from smig.rctcb.policy import Effect

log = logging.getLogger(__name__)

_END = None  # what a subscriber's queue holds last: the stream is over


class Subscription:
    """One reader's queue of ``(event name, JSON data)``."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize)

    def end(self) -> None:
        # Make room first: the end marker must get in even if the reader fell behind.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_END)


class Broadcaster:
    """Fan effects out to subscribers; ``publish`` never blocks and never fails on a reader's account."""

    def __init__(self, queue_size: int = 1024) -> None:
        self.queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self.dropped = 0
        # Called with every published batch of effects, on the event loop (the service acts on
        # some of them: an Evacuate starts an evacuation).
        self.hooks: list[Callable[[Sequence[Effect]], None]] = []

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, effects: Iterable[Effect]) -> None:
        """Send ``effects`` to every subscriber. Call it on the event loop's thread."""
        effects = list(effects)
        for hook in self.hooks:
            try:
                hook(effects)
            except Exception:  # a hook's failure must not cost the subscribers their events
                log.exception("an effect hook failed")
        self.send([(out.kind, out.model_dump_json(exclude_none=True)) for out in map(effect_out, effects)])

    def send(self, events: Sequence[tuple[str, str]]) -> None:
        """Send ready-made ``(event name, JSON data)`` events (the orchestrator's migration steps)."""
        if not events or not self._subscribers:
            return
        for sub in list(self._subscribers):
            try:
                for event in events:
                    sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(sub)
                self.dropped += 1
                log.warning("an event subscriber fell %d events behind and was dropped", self.queue_size)
                sub.end()

    def subscribe(self) -> Subscription:
        sub = Subscription(self.queue_size)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (the app is shutting down)."""
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()

    async def stream(self, heartbeat_s: float) -> AsyncIterator[str]:
        """The text of an SSE stream: a comment first (the subscription is live from there on), then
        one ``event:``/``data:`` block per effect and a comment every ``heartbeat_s`` of silence, so
        proxies keep the connection open and a reader can tell a quiet region from a dead link."""
        sub = self.subscribe()
        try:
            yield ": subscribed\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), heartbeat_s)
                except TimeoutError:
                    yield ": heartbeat\n\n"
                    continue
                if item is None:
                    return
                name, data = item
                yield f"event: {name}\ndata: {data}\n\n"
        finally:
            self.unsubscribe(sub)
