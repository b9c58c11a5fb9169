"""A thread open that fails half-way leaves the sender refundable at its initial balances.

- B offline: the open fails at once (`PeerOffline`) and nothing is locked anywhere.
- The hub offline after A and B agreed: A's request to the hub is lost; nothing is locked
  in A's channel meanwhile. When the hub is back A asks again, the open completes, and a
  close at the initial state gives everyone back exactly what they had.
- A user who gives up on an open the hub never locked closes it on its own: its balance is
  whole again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.api import PeerOffline
from node.host import HUB_PROTOCOL, THREAD_PROTOCOL
from protocols import roles
from protocols import thread as th
from protocols.types import Assets
from tests.integration.network import ETHER, Network, eventually, local_network

DEPOSIT = Assets(ETHER, 10**21)
LOCK = Assets(ETHER // 4, 10**20)


async def funded(net: Network) -> None:
    a, b = net.users
    for user in (a, b):
        await user.deposit(DEPOSIT)
        await net.hub.collateralize(user.address, LOCK)


async def test_receiver_offline_fails_the_open_and_locks_nothing(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            await funded(net)
            a, b = net.users
            b_address = b.address
            await net.stop(net.user_slots[1])
            before = a.channel()
            with pytest.raises(PeerOffline):
                await a.open_thread(b_address, LOCK, LOCK, timeout=20)
            assert a.channel() == before
            assert net.hub.channel(b_address).thread_count == 0
            assert a.balance().user == DEPOSIT


async def test_hub_offline_after_agreement_then_back(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            await funded(net)
            a, b = net.users
            hub_slot = net.hub_slot
            await a.peers.ensure(b.address, THREAD_PROTOCOL)  # A found B through the hub
            await net.stop(hub_slot)
            # Ask A's engine directly (the API refuses at once while the hub is down): A
            # and B agree the initial state; the request to the hub is lost.
            await a.engine.submit(roles.ActionOpenThread(99, b.address, LOCK, LOCK))
            await eventually(
                lambda: any(s.phase is th.ThreadPhase.AGREED for s in a.state.threads.values()),
                "A and B agreed the initial state",
            )
            (key,) = a.state.threads
            await trio.sleep(0.5)
            # Nothing locked in A's channel: A holds all it deposited.
            assert a.balance().user == DEPOSIT and a.balance().open_threads == 0
            await net.start(hub_slot)
            await eventually(
                lambda: (
                    a.state.threads[key].phase is th.ThreadPhase.OPEN
                    and b.state.threads.get(key) is not None
                    and b.state.threads[key].phase is th.ThreadPhase.OPEN
                ),
                "the open completed once the hub was back",
            )
            assert a.balance().user == DEPOSIT - LOCK
            final = await a.close_thread(key)
            assert final.state.tx_count == 0
            await eventually(lambda: b.balance().open_threads == 0, "B's channel settled")
            assert a.balance().user == DEPOSIT
            assert b.balance().user == DEPOSIT


async def test_an_open_the_hub_never_locked_can_be_abandoned(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            await funded(net)
            a, b = net.users
            await a.peers.ensure(b.address, THREAD_PROTOCOL)
            await net.stop(net.hub_slot)
            await a.engine.submit(roles.ActionOpenThread(98, b.address, LOCK, LOCK))
            await eventually(lambda: bool(a.state.threads), "A proposed the thread")
            (key,) = a.state.threads
            await eventually(lambda: a.state.threads[key].phase is th.ThreadPhase.AGREED, "agreed")
            await a.engine.submit(roles.ActionCloseThread(97, key))
            # Its channel never locked the thread: A forgets it at once.
            await eventually(lambda: key not in a.state.threads, "A gave up")
            assert a.balance().user == DEPOSIT and a.balance().open_threads == 0
            await net.start(net.hub_slot)
            # Back online (A reconnected and resynced), nothing gets locked for a thread A
            # abandoned: its channel and B's stay whole.
            await eventually(
                lambda: a.peers.is_connected(net.hub.address, HUB_PROTOCOL), "A reconnected"
            )
            await eventually(
                lambda: net.hub.channel(a.address) == a.channel(), "the hub resynced A"
            )
            assert a.balance().user == DEPOSIT and a.balance().open_threads == 0
            assert net.hub.channel(b.address).thread_count == 0
