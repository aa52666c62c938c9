"""The master's broker for streaming subtasks: the service submits single-file copies, the master
pushes them to workers with a free subtask slot, relays their progress and results back.

The service's database is the record of every subtask; the broker keeps only what is in flight,
in memory. A master restart loses that, harmlessly: the service sees its subtasks missing from
the next `sub-status` and submits them again, and a worker still copying one reports it in its
beats, so the broker adopts it instead of running it twice. A worker that stops beating for a
lease loses its subtasks to the queue; only the current holder's result counts. The ids of
subtasks it is done with (answered, canceled while queued, withdrawn) are remembered for a while,
so that a worker still reporting one is told to drop it, not adopted.

service -> master
  sub-submit  {items: [{id, spec: {src, dst}, request}]}   queue them (a known id: rebind only)
  sub-cancel  {id}                                         stop it (queued: CANCELED at once)
  sub-poll    {}                                           answered by sub-status
  sub-withdraw {ids}                                       take back those still queued (none in a lease of start)
master -> service
  sub-status  {workers, slots, known: [id], queued: [id]}  workers taking subtasks and their slots;
                                                           this client's ids
  sub-withdrawn {ids}                                      taken back: no worker will run them
  sub-progress {subs: {id: [bytes, size or -1]}}
  sub-result  {id, result}                                 engine.single.SingleResult as a dict
worker -> master (sub_free rides on hello, want, beat and these)
  sub-beat {subs: {id: [bytes, size]}}, sub-result {id, result}, sub-busy {id}
master -> worker
  subtask {id, spec, request}, sub-ack {id}, sub-cancel {id}, sub-drop {id}
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ossimport.master")
Send = Callable[..., None]  # send(identity, kind, **body)
WORKER_KINDS = ("hello", "want", "beat", "sub-beat", "sub-result", "sub-busy")
GONE_KEPT = 10000  # finished subtasks remembered, with their results (a few MB at most)


@dataclass
class Seat:
    """A connected worker as the broker sees it."""

    free: int = 0  # subtask slots it said were free, less what was pushed since
    seen: float = 0.0
    held: set[str] = field(default_factory=set)


@dataclass
class Item:
    id: str
    client: bytes | None  # the service that submitted it (None: adopted from a worker's beat)
    body: dict[str, Any] = field(default_factory=dict)  # spec and request
    worker: bytes | None = None
    deadline: float = 0.0
    result: dict[str, Any] | None = None  # its worker's word, while no service has claimed it
    since: float = field(default_factory=time.monotonic)


class StreamBroker:
    def __init__(self, lease: float, send: Send) -> None:
        self.lease = lease
        self.send = send
        self.items: dict[str, Item] = {}
        self.queue: deque[str] = deque()
        self.seats: dict[bytes, Seat] = {}
        self.born = time.monotonic()
        # finished here, oldest first, with the result sent (None: none, e.g. withdrawn): a worker
        # reporting one drops it; a service submitting one again (it never got the answer: killed,
        # or the message lost) gets the answer again instead of a second copy
        self.gone: dict[str, dict[str, Any] | None] = {}

    def workers(self) -> int:
        """Workers heard from within a lease that take subtasks (a free slot, or one at work): a
        worker started with --subtask-slots 0 is no reason for the service to send them here."""
        now = time.monotonic()
        return sum(1 for seat in self.seats.values() if now - seat.seen < self.lease and (seat.free > 0 or seat.held))

    def slots(self) -> int:
        """Subtask slots of the workers heard from within a lease (free or at work)."""
        now = time.monotonic()
        return sum(seat.free + len(seat.held) for seat in self.seats.values() if now - seat.seen < self.lease)

    # ---- messages ----------------------------------------------------------------------------------
    def handle(self, ident: bytes, kind: str, msg: dict[str, Any]) -> bool:
        """Take what concerns subtasks; True when the message was only about them (hello, want
        and beat are the master's too)."""
        if kind in WORKER_KINDS:
            seat = self.seats.setdefault(ident, Seat())
            seat.seen = time.monotonic()
            if "sub_free" in msg:
                seat.free = max(0, int(msg["sub_free"]))
        if kind == "sub-submit":
            for raw in msg.get("items", []):
                self._submit(ident, raw)
        elif kind == "sub-cancel":
            self._cancel(str(msg.get("id")))
        elif kind == "sub-poll":
            mine = [i for i in self.items.values() if i.client == ident]
            self.send(ident, "sub-status", workers=self.workers(), slots=self.slots(), known=[i.id for i in mine],
                      queued=[i.id for i in mine if i.worker is None])
        elif kind == "sub-withdraw":
            # within a lease of a (re)start no worker is known yet, but one may still be copying them
            young = time.monotonic() - self.born < self.lease
            ids = [] if young else [i for i in map(str, msg.get("ids", []))
                                    if i in self.items and self.items[i].worker is None and self.items[i].client == ident]
            for sub_id in ids:
                self.items.pop(sub_id)
                self.queue.remove(sub_id)
                self._gone(sub_id)
            self.send(ident, "sub-withdrawn", ids=ids)
        elif kind in ("sub-beat", "beat"):
            self._progress(ident, msg.get("subs") or {})
        elif kind == "sub-result":
            self._result(ident, str(msg.get("id")), msg.get("result") or {})
        elif kind == "sub-busy":
            item = self.items.get(str(msg.get("id")))
            if item is not None and item.worker == ident:
                self._requeue(item)
        self.dispatch()
        return kind.startswith("sub-")

    def _submit(self, client: bytes, raw: dict[str, Any]) -> None:
        sub_id = str(raw["id"])
        answer = self.gone.pop(sub_id, None)
        if answer is not None:
            self.send(client, "sub-result", id=sub_id, result=answer)
            self._gone(sub_id, answer)
            return
        item = self.items.get(sub_id)
        if item is not None:  # already here (a master that kept it, or adopted it): answer the new client
            item.client = client
            if item.result is not None and item.worker is not None:  # its worker finished meanwhile
                self._result(item.worker, sub_id, item.result)
                return
            if not item.body:
                item.body = {"spec": raw["spec"], "request": raw["request"]}
            return
        self.items[sub_id] = Item(sub_id, client, {"spec": raw["spec"], "request": raw["request"]})
        self.queue.append(sub_id)

    def _cancel(self, sub_id: str) -> None:
        item = self.items.get(sub_id)
        if item is None:
            return
        if item.worker is None:
            self.items.pop(sub_id)
            self.queue.remove(sub_id)
            self._gone(sub_id)  # a worker may still copy it (the master restarted): it is dropped there
            if item.client is not None:
                self.send(item.client, "sub-result", id=sub_id, result={"status": "CANCELED", "error": "canceled"})
        else:
            self.send(item.worker, "sub-cancel", id=sub_id)

    def _progress(self, ident: bytes, subs: dict[str, Any]) -> None:
        now = time.monotonic()
        by_client: dict[bytes, dict[str, Any]] = {}
        for sub_id, counts in subs.items():
            item = self.items.get(sub_id)
            if item is None and sub_id in self.gone:
                self.send(ident, "sub-drop", id=sub_id)
                continue
            if item is None:  # the master restarted while it ran: adopt it, the service will claim it
                item = self.items[sub_id] = Item(sub_id, None, worker=ident)
                self.seats[ident].held.add(sub_id)
            elif item.worker is None:  # queued again (its service spoke first after a restart): it is here
                self.queue.remove(sub_id)
                item.worker = ident
                self.seats[ident].held.add(sub_id)
            elif item.worker != ident:  # handed on after its lease lapsed: the other holder goes on
                self.send(ident, "sub-drop", id=sub_id)
                continue
            item.deadline = now + self.lease
            if item.client is not None:
                by_client.setdefault(item.client, {})[sub_id] = counts
        for client, part in by_client.items():
            self.send(client, "sub-progress", subs=part)

    def _result(self, ident: bytes, sub_id: str, result: dict[str, Any]) -> None:
        item = self.items.get(sub_id)
        if item is None and sub_id in self.gone:
            self.send(ident, "sub-ack", id=sub_id)  # answered already (the ack was lost), or nobody waits for it
            return
        if item is None:
            item = self.items[sub_id] = Item(sub_id, None, worker=ident)  # a master restart: keep it
        if item.worker != ident:
            self.send(ident, "sub-ack", id=sub_id)  # not its holder's word: ignored
            return
        if item.client is None:
            item.deadline = time.monotonic() + self.lease
            item.result = result  # acknowledged after two leases unclaimed (see expire)
            return  # no service claimed it yet: the worker sends it again, the next time it may be
        self.items.pop(sub_id)
        self._gone(sub_id, result)
        self.seats.get(ident, Seat()).held.discard(sub_id)
        self.send(item.client, "sub-result", id=sub_id, result=result)
        self.send(ident, "sub-ack", id=sub_id)

    def _gone(self, sub_id: str, result: dict[str, Any] | None = None) -> None:
        self.gone[sub_id] = result
        if len(self.gone) > GONE_KEPT:
            del self.gone[next(iter(self.gone))]

    # ---- placing and lapsing ----------------------------------------------------------------------------
    def dispatch(self) -> None:
        now = time.monotonic()
        while self.queue:
            seats = [(s.free, ident) for ident, s in self.seats.items() if s.free > 0 and now - s.seen < self.lease]
            if not seats:
                return
            _, ident = max(seats)  # the emptiest worker first: subtasks spread over hosts
            item = self.items[self.queue.popleft()]
            seat = self.seats[ident]
            seat.free -= 1
            seat.held.add(item.id)
            item.worker, item.deadline = ident, now + self.lease
            self.send(ident, "subtask", id=item.id, **item.body)

    def _requeue(self, item: Item) -> None:
        if item.worker is not None:
            self.seats.get(item.worker, Seat()).held.discard(item.id)
        item.worker = None
        if not item.body:  # adopted and never claimed: nothing to run it with
            self.items.pop(item.id, None)
            return
        self.queue.appendleft(item.id)

    def expire(self) -> None:
        now = time.monotonic()
        for item in list(self.items.values()):
            if item.worker is not None and item.deadline <= now:
                log.warning("subtask %s: its worker went silent; handing it on", item.id)
                self.send(item.worker, "sub-drop", id=item.id)
                if item.body:  # the next holder removes what a worker killed mid-copy left at the destination
                    item.body["request"]["again"] = True
                self._requeue(item)
            elif item.client is None and item.result is not None and now - item.since > 2 * self.lease:
                # a result nobody claims (its service got it from the master before a restart of
                # this one): the worker stops resending it; a service asking later still gets it
                self.items.pop(item.id)
                self._gone(item.id, item.result)
                if item.worker is not None:
                    self.seats.get(item.worker, Seat()).held.discard(item.id)
                    self.send(item.worker, "sub-ack", id=item.id)
        for ident in [i for i, s in self.seats.items() if now - s.seen > 10 * self.lease]:
            del self.seats[ident]
        self.dispatch()
