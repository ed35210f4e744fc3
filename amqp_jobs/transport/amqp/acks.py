"""Acks and nacks of one channel, batched: one frame a turn of the event loop.

Sent one by one, a no-op job's ack was a frame and a socket write of its own, a tenth
of the worker's CPU per job and as much work again for the broker. Settlements made in
one turn of the loop go out together at the start of the next, in one write:

- nacks first, each alone (they carry a requeue flag);
- then one ack with ``multiple`` up to the newest of the oldest deliveries that are all
  settled;
- then single acks for those settled behind a delivery still running: a slow job must
  not hold its neighbours' acks, which would hold their prefetch slots.

The ``multiple`` tag is always one we ack ourselves: RabbitMQ closes the channel for a
tag it does not hold, even with ``multiple``.
"""

from __future__ import annotations

import asyncio

import aiormq
from aiormq import spec
from aiormq.abc import ChannelFrame


class Acks:
    """The unsettled deliveries of one channel, in delivery order, and what is due."""

    __slots__ = ("_loop", "_nacks", "_open", "_raw", "_scheduled", "_spilled")

    def __init__(self, raw: aiormq.Channel) -> None:
        self._raw = raw
        self._loop = asyncio.get_running_loop()
        #: delivery tag -> settled by an ack, in the order the broker handed them out
        self._open: dict[int, bool] = {}
        self._nacks: list[spec.Basic.Nack] = []
        self._scheduled = False
        #: frames waiting for room in a full write queue (kept so they are not collected)
        self._spilled: set[asyncio.Task[None]] = set()

    def delivered(self, tag: int) -> None:
        self._open[tag] = False

    def ack(self, tag: int) -> bool:
        """Settle a delivery; False if it is not unsettled here (RabbitMQ would close
        the channel for it: "unknown delivery tag"), and nothing is sent."""
        if self._open.get(tag) is not False:
            return False
        self._open[tag] = True
        self._due()
        return True

    def nack(self, tag: int, *, requeue: bool) -> bool:
        if self._open.get(tag) is not False:
            return False
        del self._open[tag]
        self._nacks.append(spec.Basic.Nack(delivery_tag=tag, requeue=requeue))
        self._due()
        return True

    def _due(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Queue what is settled for the connection's writer, now."""
        self._scheduled = False
        frames: list[spec.Basic.Nack | spec.Basic.Ack] = list(self._nacks)
        self._nacks.clear()
        prefix: list[int] = []
        behind: list[int] = []
        running = False
        for tag, acked in self._open.items():
            if not acked:
                running = True
            elif running:
                behind.append(tag)
            else:
                prefix.append(tag)
        if prefix:
            frames.append(spec.Basic.Ack(delivery_tag=prefix[-1], multiple=len(prefix) > 1))
        frames.extend(spec.Basic.Ack(delivery_tag=tag) for tag in behind)
        for tag in (*prefix, *behind):
            del self._open[tag]
        if not frames or self._raw.is_closed:
            return  # a closed channel's deliveries go back to their queues anyway
        frame = ChannelFrame.marshall(channel_number=self._raw.number, frames=frames)
        queue = self._raw.write_queue
        try:
            queue.put_nowait(frame)
        except asyncio.QueueFull:
            spill = self._loop.create_task(queue.put(frame))
            self._spilled.add(spill)
            spill.add_done_callback(self._spilled.discard)

    async def flushed(self) -> None:
        """Flush, and wait until what spilled over a full write queue is queued too."""
        self.flush()
        if self._spilled:
            await asyncio.gather(*self._spilled, return_exceptions=True)
