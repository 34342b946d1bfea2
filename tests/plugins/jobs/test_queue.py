"""FairQueue: a flooding tenant does not starve the others; classes and weights hold."""

from __future__ import annotations

import pytest

from overdrive.plugins.jobs import FairQueue, QueueFull, TenantFull


def order(q: FairQueue) -> list[str]:
    out = []
    while (item := q.pop_nowait()) is not None:
        out.append(item)
    return out


def test_a_late_tenant_is_served_next_not_after_the_flood() -> None:
    for fifo in (False, True):
        q = FairQueue(1000, 1000, fifo=fifo)
        for i in range(500):
            q.push(f"a{i}", "A")
        q.pop_nowait()  # a0 runs
        for i in range(10):
            q.push(f"b{i}", "B")
        got = order(q)
        first_b = got.index("b0")
        assert first_b == (499 if fifo else 0)  # FIFO: behind all of A; fair: next
        if not fifo:
            # B's ten are interleaved with A's: all served within the first 20
            assert max(got.index(f"b{i}") for i in range(10)) < 20


def test_weights_share_the_queue_in_proportion() -> None:
    q = FairQueue(1000, 1000, {"A": 3.0})
    for i in range(300):
        q.push(("A", i), "A")
        q.push(("B", i), "B")
    first = order(q)[:400]
    a = sum(1 for t, _ in first if t == "A")
    assert a == 300  # three A for each B until A runs out


def test_interactive_goes_before_batch() -> None:
    q = FairQueue(100, 100)
    q.push("b1", "T", "batch")
    q.push("i1", "T", "interactive")
    q.push("b2", "U", "batch")
    q.push("i2", "U", "interactive")
    assert order(q) == ["i1", "i2", "b1", "b2"]


def test_bounds_positions_and_removal() -> None:
    q = FairQueue(3, 2)
    q.push("x", "A")
    q.push("y", "A")
    with pytest.raises(TenantFull):
        q.push("z", "A")
    q.push("w", "B")
    with pytest.raises(QueueFull):
        q.push("v", "C")
    assert [q.position(i) for i in ("x", "w", "y")] == [0, 1, 2]
    assert q.remove("w") and not q.remove("w")
    assert q.position("w") is None and q.position("y") == 1
    assert q.depths() == {"A": 2} and len(q) == 2
    assert order(q) == ["x", "y"]


def test_idle_tenants_are_forgotten_so_the_tag_table_stays_bounded() -> None:
    q = FairQueue(10, 10)
    for i in range(200):
        q.push(i, f"t{i}")
        q.pop_nowait()
    assert len(q._last) <= 4 * 10 + 1
