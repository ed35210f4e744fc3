"""Delay cascade arithmetic, checked by simulating the broker's topic routing."""

import re

import aiormq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amqp_jobs import ContractError, TopologySettings
from amqp_jobs import topology as t
from amqp_jobs.transport.amqp.declare import explain_mismatch

S = TopologySettings()
YEAR_MS = 365 * 86_400_000


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: * is one word, # is zero or more words."""
    regex = re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\#", r".*")
    regex = regex.replace(r"\.\.\*", r"(\..*)?").replace(r"\..*", r"(\..*)?")
    return re.fullmatch(regex, key) is not None


def simulate(exchange: str, key: str, ns: str, s: TopologySettings) -> tuple[int, str | None]:
    """Follow bindings from ``exchange`` as the broker would: (total TTL, final queue)."""
    total = 0
    while True:
        if exchange == t.deliver_exchange(ns):
            queues = [q for q in ["emails", "sms"] if topic_match(t.deliver_binding(q, s), key)]
            assert len(queues) <= 1
            return total, (t.due_queue(ns, queues[0]) if queues else None)
        level = int(exchange.rsplit(".", 1)[1])
        to_queue = topic_match(t.level_binding(level, "1", s), key)
        onward = topic_match(t.level_binding(level, "0", s), key)
        assert to_queue != onward, "every key takes exactly one path at each level"
        below = t.delay_exchange(ns, level - 1) if level else t.deliver_exchange(ns)
        if to_queue:
            args = t.delay_queue_arguments(ns, level, s)
            total += args["x-message-ttl"]
            assert args["x-dead-letter-exchange"] == below
        exchange = below


def test_defaults_reach_beyond_a_year() -> None:
    assert S.max_delay_ms >= YEAR_MS
    assert S.delay_levels == 29
    assert S.delay_unit_ms == 100


@given(st.integers(min_value=0, max_value=S.max_units), st.sampled_from(["emails", "sms"]))
def test_cascade_spends_exactly_the_spelt_delay(units: int, queue: str) -> None:
    key = t.delay_routing_key(units, queue, S)
    assert t.parse_delay_routing_key(key, S) == (units, queue)
    start = t.delay_exchange("ns", S.delay_levels - 1)
    total, dest = simulate(start, key, "ns", S)
    assert total == units * S.delay_unit_ms
    assert dest == t.due_queue("ns", queue)


@given(st.integers(min_value=0, max_value=2 * YEAR_MS))
def test_delayed_route_is_never_early_and_enters_at_the_top_set_bit(delay_ms: int) -> None:
    exchange, key = t.delayed_route("ns", "emails", delay_ms, S)
    units, _ = t.parse_delay_routing_key(key, S)
    total, dest = simulate(exchange, key, "ns", S)
    assert dest == t.due_queue("ns", "emails")
    assert total <= delay_ms, "the broker never holds a job past its ETA"
    if delay_ms <= S.max_delay_ms:
        # at most one unit plus the hop allowance is left for the worker to wait out
        first_guess = delay_ms // S.delay_unit_ms
        lead = t.PUBLISH_ALLOWANCE_MS + t.HOP_ALLOWANCE_MS * first_guess.bit_count()
        assert delay_ms - total <= S.delay_unit_ms + lead
        assert delay_ms - total <= S.hold_window_ms
    if units:
        assert exchange == t.delay_exchange("ns", units.bit_length() - 1)
    else:
        assert exchange == t.deliver_exchange("ns")


def test_queue_name_is_one_final_word() -> None:
    key = t.delay_routing_key(5, "emails", S)
    assert not topic_match(t.deliver_binding("mails", S), key)
    assert not topic_match(t.deliver_binding("emails", S), key + ".x")
    assert topic_match(t.deliver_binding("emails", S), key)


def test_routing_key_fits_amqp_limit() -> None:
    assert len(t.delay_routing_key(S.max_units, "q" * 100, S).encode()) <= 255


def test_units_out_of_range() -> None:
    with pytest.raises(ValueError, match="units must be"):
        t.delay_routing_key(S.max_units + 1, "q", S)


def test_names() -> None:
    assert t.jobs_exchange("shop") == "shop.jobs"
    assert t.work_queue("shop", "emails") == "shop.q.emails"
    assert t.dead_queue("shop", "emails") == "shop.dead.emails"
    assert t.delay_queue("shop", 3) == "shop.delay.3"
    assert t.unroutable("shop") == "shop.unroutable"


def test_queue_arguments() -> None:
    args = t.work_queue_arguments("shop", "emails", S)
    assert args == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "shop.dead",
        "x-dead-letter-routing-key": "emails",
        "x-delivery-limit": 10,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-queue-leader-locator": "balanced",
    }
    classic = t.work_queue_arguments("shop", "emails", TopologySettings(queue_type="classic"))
    assert "x-delivery-limit" not in classic
    assert "x-queue-leader-locator" not in classic
    assert classic["x-queue-type"] == "classic"
    level = t.delay_queue_arguments("shop", 4, S)
    assert level["x-message-ttl"] == 1600
    assert level["x-dead-letter-strategy"] == "at-least-once"
    # every quorum queue spreads its leaders over a cluster's nodes
    assert level["x-queue-leader-locator"] == "balanced"
    assert t.parking_queue_arguments(S)["x-queue-leader-locator"] == "balanced"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_type": "stream"},
        {"delivery_limit": 0},
        {"delay_unit_ms": 0},
        {"delay_levels": 41},
        {"delay_unit_ms": 3000, "delay_levels": 29},  # top TTL beyond the broker's limit
    ],
)
def test_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ContractError):
        TopologySettings(**kwargs)  # type: ignore[arg-type]


def test_mismatch_is_explained() -> None:
    exc = aiormq.exceptions.ChannelPreconditionFailed(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'shop.q.emails' in"
        " vhost '/': received the value 'quorum' of type 'longstr' but current is none"
    )
    err = explain_mismatch(exc)
    assert "queue 'shop.q.emails' already exists with x-queue-type=none" in str(err)
    assert "drain and delete" in str(err)
