"""The first delayed job of a fresh namespace, from a new client: connect, declare what it
needs (the namespace's exchanges, its work queue, the delay cascade's exchanges and the
levels of its delay) and publish it, confirmed. The baseline, raw aio-pika, declares the
same plan one command at a time on one channel, as a script would, then publishes."""

from __future__ import annotations

import time
from typing import Any

import aio_pika

from amqp_jobs import JobClient, TopologySettings
from amqp_jobs.topology import (
    Plan,
    base_plan,
    cascade_exchanges_plan,
    delayed_route,
    level_plan,
    queue_plan,
    route_levels,
)
from bench.common import URL, Spread, args, bench_job, cleanup, namespace

#: What the README promises for the first delayed publish, on this kind of machine.
TARGET_MS = 150.0
#: A minute needs 6 delay levels, a day 14: the cost grows with the bits set.
DELAYS_MS = (60_000, 86_400_000)


def _plan(ns: str, s: TopologySettings, delay_ms: int) -> Plan:
    plan = base_plan(ns, s) + queue_plan(ns, "bench", ["bench.signup"], s)
    plan += cascade_exchanges_plan(ns, s)
    for level in route_levels(delay_ms, s):
        plan += level_plan(ns, level, s)
    return plan


async def ours_ms(delay_ms: int) -> float:
    ns = namespace("first-delay")
    try:
        began = time.perf_counter()
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue(bench_job(), args(0), delay=delay_ms / 1000)
            return (time.perf_counter() - began) * 1000
    finally:
        await cleanup(ns, {"bench"})


async def raw_ms(delay_ms: int) -> float:
    ns = namespace("first-delay-raw")
    s = TopologySettings()
    plan = _plan(ns, s, delay_ms)
    try:
        began = time.perf_counter()
        connection = await aio_pika.connect(URL)
        try:
            channel = await connection.channel(publisher_confirms=True)
            raw = await channel.get_underlay_channel()
            for ex in plan.exchanges:
                await raw.exchange_declare(
                    ex.name, exchange_type=ex.type, durable=True, arguments=ex.arguments or None
                )
            for q in plan.queues:
                await raw.queue_declare(q.name, durable=True, arguments=q.arguments)
            for b in plan.bindings:
                if b.to_exchange:
                    await raw.exchange_bind(b.destination, b.source, routing_key=b.key)
                else:
                    await raw.queue_bind(b.destination, b.source, routing_key=b.key)
            exchange, key = delayed_route(ns, "bench", delay_ms, s)
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(aio_pika.Message(b"{}"), key, mandatory=True)
            return (time.perf_counter() - began) * 1000
        finally:
            await connection.close()
    finally:
        await cleanup(ns, {"bench"})


async def bench_first_delay(runs: int) -> dict[str, Any]:
    """Alternating runs per delay; milliseconds from creating the client to the confirm."""
    rows = []
    for delay_ms in DELAYS_MS:
        ours: list[float] = []
        raw: list[float] = []
        for run in range(runs):
            for kind in ("ours", "raw") if run % 2 == 0 else ("raw", "ours"):
                if kind == "ours":
                    ours.append(await ours_ms(delay_ms))
                else:
                    raw.append(await raw_ms(delay_ms))
        rows.append(
            {
                "delay_ms": delay_ms,
                "levels": len(route_levels(delay_ms, TopologySettings())),
                "amqp_jobs_ms": Spread.of(ours).to_json(),
                "raw_aio_pika_ms": Spread.of(raw).to_json(),
            }
        )
    return {"target_ms": TARGET_MS, "delays": rows}


def report_line(r: dict[str, Any]) -> str:
    lines = []
    for row in r["delays"]:
        o, w = row["amqp_jobs_ms"], row["raw_aio_pika_ms"]
        lines.append(
            f"first delayed publish, new client and namespace, {row['delay_ms'] / 1000:,.0f} s"
            f" delay ({row['levels']} levels): {o['median']:.0f} ms ({o['min']:.0f}-{o['max']:.0f};"
            f" target ≤ {r['target_ms']:.0f}), raw aio-pika declaring the same one command at"
            f" a time {w['median']:.0f} ms ({w['min']:.0f}-{w['max']:.0f}),"
            f" {w['median'] / o['median']:.1f}x faster"
        )
    return "\n".join(lines)
