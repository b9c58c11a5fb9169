"""Nodes stopped, killed and restarted mid-thread lose nothing and pay nothing twice.

Payments are checked against the thread's final state: after everything settles, both
parties hold the same double-signed state and it moved by exactly the payments that were
made, each once.
"""

from __future__ import annotations

from pathlib import Path

import trio

from node.api import Node
from protocols import thread as th
from protocols.types import Assets, ThreadKey
from tests.integration.network import (
    ETHER,
    Network,
    crash_after_next_commit,
    eventually,
    local_network,
)

DEPOSIT = Assets(ETHER, 10**21)
LOCK = Assets(ETHER // 4, 10**20)


async def thread_between(net: Network) -> ThreadKey:
    a, b = net.users
    for user in (a, b):
        await user.deposit(DEPOSIT)
        await net.hub.collateralize(user.address, LOCK)
    return await a.open_thread(b.address, LOCK, LOCK)


def settled(net: Network, key: ThreadKey) -> bool:
    """Both sides hold the same latest state with nothing in flight or queued."""
    sides = [u.state.threads.get(key) for u in net.users]
    if any(s is None or s.latest is None or s.outgoing or s.queued for s in sides):
        return False
    return sides[0].latest == sides[1].latest  # type: ignore[union-attr]


def balance_of_receiver(node: Node, key: ThreadKey) -> Assets:
    side = node.state.threads[key]
    assert side.latest is not None
    return side.latest.state.balance_receiver


async def test_payments_queued_while_the_peer_is_down_survive_a_restart_of_both(
    tmp_path: Path,
) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            key = await thread_between(net)
            a, b = net.users
            a_slot, b_slot = net.user_slots
            await net.stop(b_slot)
            amounts = [Assets(1000 + i, i) for i in range(100)]
            for amount in amounts:
                a.start_payment(key, amount)
            # A stored all 100 as proposals (B is down: none is countersigned).
            await eventually(
                lambda: (
                    len(a.state.threads[key].outgoing) + len(a.state.threads[key].queued) == 100
                ),
                "A holds the 100 payments",
            )
            await net.restart(a_slot)
            await net.start(b_slot)
            await eventually(lambda: settled(net, key), "both sides settled", timeout=30)
            a, b = net.users
            total = sum(amounts, Assets())
            assert balance_of_receiver(b, key) == LOCK + total
            assert a.state.threads[key].latest.state.tx_count == 100  # type: ignore[union-attr]


async def crash_and_recover(net: Network, victim: int, key: ThreadKey, amount: Assets) -> None:
    """Arm `victim` (0: A, 1: B, 2: the hub) to die after its next commit, make one payment
    from A that gets it there, restart it, and wait for the thread to settle."""
    slots = [*net.user_slots, net.hub_slot]
    a = net.users[0]
    crash_after_next_commit(slots[victim])
    before = balance_of_receiver(net.users[1], key)
    a.start_payment(key, amount)
    if victim < 2:
        error = await net.wait_down(slots[victim])
        assert error is not None, "the node should have been killed"
        await net.start(slots[victim])
    await eventually(lambda: settled(net, key), "thread settled after the crash", timeout=30)
    assert balance_of_receiver(net.users[1], key) == before + amount


async def test_killed_between_commit_and_send_loses_nothing_and_pays_once(
    tmp_path: Path,
) -> None:
    with trio.fail_after(180):
        async with local_network(tmp_path, users=2) as net:
            key = await thread_between(net)
            a, b = net.users
            for _ in range(3):
                await a.pay(key, Assets(7, 7))
            # A dies after storing its signed proposal, before sending it.
            await crash_and_recover(net, 0, key, Assets(1001, 1))
            # B dies after storing the countersigned state, before sending its signature.
            await crash_and_recover(net, 1, key, Assets(2002, 2))
            a, b = net.users
            assert a.state.threads[key].latest.state.tx_count == 5  # type: ignore[union-attr]
            # The thread still works both ways after both crashes.
            await b.pay(key, Assets(5, 0))
            await a.pay(key, Assets(6, 0))
            await eventually(lambda: settled(net, key), "settled")
            final = await a.close_thread(key)
            assert final.state.balance_receiver == LOCK + Assets(7 * 3 + 1001 + 2002 - 5 + 6, 24)


async def test_hub_killed_mid_open_and_mid_close_completes_after_restart(
    tmp_path: Path,
) -> None:
    with trio.fail_after(180):
        async with local_network(tmp_path, users=2) as net:
            a, b = net.users
            for user in (a, b):
                await user.deposit(DEPOSIT)
                await net.hub.collateralize(user.address, LOCK)
            # The hub dies after storing its first lock proposal, before sending it.
            crash_after_next_commit(net.hub_slot)
            async with trio.open_nursery() as nursery:
                keys: list[ThreadKey] = []

                async def open_it() -> None:
                    keys.append(await a.open_thread(b.address, LOCK, LOCK, timeout=60))

                nursery.start_soon(open_it)
                assert await net.wait_down(net.hub_slot) is not None
                await net.start(net.hub_slot)
            (key,) = keys
            assert b.state.threads[key].phase is th.ThreadPhase.OPEN
            await a.pay(key, Assets(10, 10))
            # And again while it settles the close.
            crash_after_next_commit(net.hub_slot)
            async with trio.open_nursery() as nursery:
                finals = []

                async def close_it() -> None:
                    finals.append(await a.close_thread(key, timeout=60))

                nursery.start_soon(close_it)
                assert await net.wait_down(net.hub_slot) is not None
                await net.start(net.hub_slot)
            await eventually(lambda: b.balance().open_threads == 0, "B's channel settled")
            assert a.balance().user == DEPOSIT - Assets(10, 10)
            assert b.balance().user == DEPOSIT + Assets(10, 10)
