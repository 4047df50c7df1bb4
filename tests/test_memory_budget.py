"""`MemoryBudget`: device memory admitted in bytes, first come first served, nothing leaked on cancel."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import MemoryBudget


async def hold(budget: MemoryBudget, nbytes: int, log: list[str], name: str, release: asyncio.Event) -> None:
    async with budget.reserve(nbytes):
        log.append(f"{name} in ({budget.reserved})")
        await release.wait()
    log.append(f"{name} out")


def test_requests_wait_for_memory_in_order_and_an_oversized_one_runs_alone() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(lambda: 100)
        log: list[str] = []
        events = {name: asyncio.Event() for name in "abcd"}
        tasks = [
            asyncio.create_task(hold(budget, size, log, name, events[name]))
            for name, size in (("a", 60), ("b", 30), ("c", 50), ("d", 500))
        ]
        await asyncio.sleep(0.01)
        assert log == ["a in (60)", "b in (90)"], "c waits: 90 + 50 would pass 100"
        events["b"].set()
        await asyncio.sleep(0.01)
        assert "c in (110)" not in log and "c in" not in " ".join(log)
        events["a"].set()
        await asyncio.sleep(0.01)
        assert log[-1] == "c in (50)"
        events["c"].set()
        await asyncio.sleep(0.01)
        assert log[-1] == "d in (100)", "larger than the budget: runs alone, counted as the whole budget"
        events["d"].set()
        await asyncio.gather(*tasks)
        assert budget.reserved == 0 and budget.peak_reserved == 100 and budget.waited == 2
        return log

    asyncio.run(scenario())


def test_a_request_cancelled_while_waiting_leaves_no_reservation_and_lets_the_next_in() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(lambda: 100)
        log: list[str] = []
        first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(budget, 80, log, "a", first))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(hold(budget, 50, log, "b", second))
        behind = asyncio.create_task(hold(budget, 10, log, "c", third))
        await asyncio.sleep(0.01)
        assert log == ["a in (80)"], "c waits behind b: first come, first served"
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert log == ["a in (80)", "c in (90)"]
        first.set()
        third.set()
        await asyncio.gather(holder, behind)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert budget.reserved == 0

    asyncio.run(scenario())


def test_no_capacity_means_no_waiting() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(lambda: None)
        async with budget.reserve(10**12), budget.reserve(10**12):
            assert budget.reserved == 2 * 10**12
        assert budget.reserved == 0 and budget.waited == 0

    asyncio.run(scenario())
