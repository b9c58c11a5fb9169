"""Every request that cannot be done raises its own typed error, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.api import (
    HubOffline,
    InsufficientBalance,
    InsufficientCollateral,
    RequestTimeout,
    ThreadClosing,
    UnknownPeer,
    UnknownThread,
)
from protocols import thread as th
from protocols.signing import Signer
from protocols.types import Assets, ThreadKey
from tests.integration.network import ETHER, eventually, local_network, new_key

DEPOSIT = Assets(ETHER, 10**21)
LOCK = Assets(ETHER // 4, 10**20)


async def test_typed_errors_end_to_end(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with local_network(
            tmp_path, users=2, collateral_ceiling=Assets(ETHER, 10**21)
        ) as net:
            a, b = net.users
            await a.deposit(DEPOSIT)
            stranger = Signer(new_key()).address

            # More than my channel holds.
            with pytest.raises(InsufficientBalance):
                await a.open_thread(b.address, DEPOSIT + Assets(1, 0))
            with pytest.raises(InsufficientBalance):
                await a.withdraw(DEPOSIT + Assets(0, 1))
            assert a.balance().user == DEPOSIT

            # No hub collateral in B's channel yet: the exact shortfall, and the hub adds it.
            with pytest.raises(InsufficientCollateral) as short:
                await a.open_thread(b.address, LOCK)
            assert short.value.missing == LOCK
            await eventually(
                lambda: net.hub.channel(b.address).balance_hub.covers(LOCK),
                "the hub collateralized B's channel",
            )
            key = await a.open_thread(b.address, LOCK)

            # Paying more than the thread holds; a thread that does not exist.
            with pytest.raises(InsufficientBalance):
                await a.pay(key, LOCK + Assets(1, 0))
            with pytest.raises(UnknownThread):
                await a.pay(ThreadKey(a.address, b.address, 999), Assets(1, 0))
            # Nobody the hub knows.
            with pytest.raises(UnknownPeer):
                await a.open_thread(stranger, Assets(1, 0))

            # B goes away mid-close: A's close waits for B's notice, a second close is
            # refused while the first is under way, and so is any payment.
            await net.stop(net.user_slots[1])
            with pytest.raises(RequestTimeout):
                await a.close_thread(key, timeout=1)
            assert a.state.threads[key].phase is th.ThreadPhase.CLOSING
            with pytest.raises(ThreadClosing):
                await a.close_thread(key)
            with pytest.raises(ThreadClosing):
                await a.pay(key, Assets(1, 0))
            assert a.balance().user == DEPOSIT - LOCK  # nothing was paid

            # The hub is down: requests that need it say so at once.
            await net.stop(net.hub_slot)
            with pytest.raises(HubOffline):
                await a.deposit(Assets(1, 0))
            with pytest.raises(HubOffline):
                await a.withdraw(Assets(1, 0))
            assert a.balance().user == DEPOSIT - LOCK
