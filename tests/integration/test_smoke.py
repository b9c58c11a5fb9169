"""First light: a hub and two users, one deposit, one thread, a few payments."""

from __future__ import annotations

from pathlib import Path

import trio

from protocols.types import Assets
from tests.integration.network import ETHER, eventually, local_network


async def test_deposit_thread_pay_close_withdraw(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            a, b = net.users
            await a.deposit(Assets(ETHER, 10**18))
            assert a.balance().user == Assets(ETHER, 10**18)
            await net.hub.collateralize(b.address, Assets(ETHER, 10**18))
            key = await a.open_thread(b.address, Assets(ETHER // 10, 10**17))
            for _ in range(5):
                await a.pay(key, Assets(1000, 10))
            assert b.thread(key).mine == Assets(5000, 50)
            final = await a.close_thread(key)
            assert final.state.tx_count == 5
            await eventually(lambda: b.balance().open_threads == 0, "B's channel settled")
            assert b.balance().user == Assets(5000, 50)
