"""Report batches from many agents, judged in groups: one transaction (one fsync) per group.

Every accepted batch must be durable before its agent hears "accepted", and with SQLite in
``synchronous=FULL`` a commit costs about as much as judging a whole batch. So the API does not
commit each request on its own: requests that arrive while a group is being judged wait in a
queue, and the next group takes all of them (group commit, as databases do for their log). A
request's answer still comes only after the transaction that holds it has committed; a lone
request is judged at once, with no added wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from smig.aim.report import SignedReport
from smig.errors import ReportRejected
from smig.rctcb.region import Region, ReportResult

_Request = tuple[Sequence[str], str]  # (wire items, the agent they came from)


def judge(region: Region, requests: Sequence[_Request], now: float) -> list[list[ReportResult]]:
    """Parse and judge the requests (blocking), in order, results per request.

    A wire item that does not parse cannot reach the region (it takes parsed reports), so its
    refusal is recorded here, in one transaction for the group; the rest is judged by
    :meth:`Region.ingest_many` in another, and an item that was a monitor's batch yields one result
    per report it holds.
    """
    judged: list[list[list[ReportResult]]] = []
    parsed: list[tuple[str | None, list[SignedReport]]] = []
    where: list[list[int]] = []
    malformed: list[tuple[str, int, ReportRejected]] = []
    for wires, agent in requests:
        items: list[list[ReportResult]] = []
        signed: list[SignedReport] = []
        positions: list[int] = []
        for i, wire in enumerate(wires):
            try:
                signed.append(SignedReport.from_wire(wire))
                positions.append(i)
                items.append([])
            except ReportRejected as e:
                items.append([ReportResult(None, e.host or agent, e.reason, e.message, item=i)])
                malformed.append((agent, i, e))
        judged.append(items)
        parsed.append((agent, signed))
        where.append(positions)
    if malformed:
        with region.store.transaction() as tx:
            for agent, i, refused in malformed:
                body = {"reason": refused.reason, "message": refused.message, "agent": agent, "index": i}
                tx.audit("report.rejected", refused.host or "", body, now)
    if any(signed for _, signed in parsed):
        for request, results in enumerate(region.ingest_many(parsed, now)):
            for result in results:
                judged[request][where[request][result.item]].append(result)
    return [[r for item in items for r in item] for items in judged]


class IngestQueue:
    """Group commit for ``POST /v1/reports``; lives on the app's event loop."""

    def __init__(self, region: Region, clock: Callable[[], float]) -> None:
        self._region = region
        self._clock = clock
        self._waiting: list[tuple[_Request, asyncio.Future[list[ReportResult]]]] = []
        self._draining = False
        self.groups = 0  # how many transactions served the requests so far (for the metrics)

    async def submit(self, wires: Sequence[str], agent: str) -> list[ReportResult]:
        future: asyncio.Future[list[ReportResult]] = asyncio.get_running_loop().create_future()
        self._waiting.append(((wires, agent), future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    results = await asyncio.to_thread(judge, self._region, [r for r, _ in group], self._clock())
                except Exception as e:  # the group's transaction failed: each request learns why
                    for _, future in group:
                        if not future.done():
                            future.set_exception(e)
                    continue
                self.groups += 1
                for (_, future), result in zip(group, results, strict=True):
                    if not future.done():  # a client that went away leaves a cancelled future
                        future.set_result(result)
        finally:
            self._draining = False
