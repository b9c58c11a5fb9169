"""The whole life of threads between real nodes, with every wei and token accounted for.

A hub and three users in one process, each a real node (libp2p on 127.0.0.1, its own
SQLite store, the embedded chain): deposits of ETH and tokens, collateral, three threads,
1,000 payments in both directions (sequential and pipelined), a routed hub payment, closes,
withdrawals to fresh addresses, and the hub taking its collateral back. At the end the
chain must show exactly what the payments imply.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from node.api import Node
from protocols import roles
from protocols import thread as th
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Address, Assets, ThreadKey
from tests.integration.network import ETHER, eventually, local_network, new_key

DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)


async def pay_many(
    payer: Node, key: ThreadKey, amounts: list[Assets], sent: dict[Address, Assets]
) -> None:
    """Pay `amounts` over `key`: half one at a time, half pipelined."""
    half = len(amounts) // 2
    for amount in amounts[:half]:
        await payer.pay(key, amount)
    payments = [payer.start_payment(key, amount) for amount in amounts[half:]]
    for payment in payments:
        await payment.wait()
    total = sum(amounts, NO_ASSETS)
    sent[payer.address] = sent.get(payer.address, NO_ASSETS) + total


async def test_three_users_thousand_payments_every_wei_accounted(tmp_path: Path) -> None:
    rng = random.Random(4)
    with trio.fail_after(300):
        async with local_network(tmp_path, users=3) as net:
            a, b, c = net.users
            hub = net.hub
            reserve_before = await hub.reserve()
            received_events: dict[Address, list[object]] = {u.address: [] for u in net.users}

            async def record(node: Node) -> None:
                async for event in node.events():
                    received_events[node.address].append(event)

            async with trio.open_nursery() as watchers:
                for user in net.users:
                    watchers.start_soon(record, user)
                await trio.sleep(0)

                for user in net.users:
                    await user.deposit(DEPOSIT)
                    assert user.balance().user == DEPOSIT
                for user in net.users:
                    added = await hub.collateralize(user.address, LOCK + LOCK)
                    assert hub.balance(user.address).hub == added
                # Threads A->B, B->C, C->A, each side locking LOCK.
                keys = {
                    (a, b): await a.open_thread(b.address, LOCK, LOCK),
                    (b, c): await b.open_thread(c.address, LOCK, LOCK),
                    (c, a): await c.open_thread(a.address, LOCK, LOCK),
                }
                for user in net.users:
                    assert user.balance().open_threads == 2
                    assert user.balance().user == DEPOSIT - LOCK - LOCK

                sent: dict[Address, Assets] = {}
                plan = [(a, b, 300), (b, a, 200), (b, c, 200), (c, b, 100), (c, a, 150), (a, c, 50)]
                for payer, payee, count in plan:
                    pair = (payer, payee) if (payer, payee) in keys else (payee, payer)
                    amounts = [
                        Assets(rng.randint(1, 10**12), rng.randint(0, 10**15)) for _ in range(count)
                    ]
                    await pay_many(payer, keys[pair], amounts, sent)
                assert sum(n for _, _, n in plan) == 1000

                # A routed payment through the hub, channel to channel.
                routed = Assets(12345, 678)
                await a.pay_via_hub(c.address, routed)
                await eventually(
                    lambda: any(
                        isinstance(e, roles.EventHubPaymentReceived) and e.amount == routed
                        for e in received_events[c.address]
                    ),
                    "C received the routed payment",
                )

                for (opener, _), key in keys.items():
                    await opener.close_thread(key)
                for user in net.users:
                    await eventually(
                        lambda user=user: user.balance().open_threads == 0, "threads settled"
                    )
                watchers.cancel_scope.cancel()

            net_flow = {u.address: DEPOSIT - sent.get(u.address, NO_ASSETS) for u in net.users}
            received = {u.address: NO_ASSETS for u in net.users}
            for user in net.users:
                for event in received_events[user.address]:
                    if isinstance(event, th.EventPaymentReceived):
                        received[user.address] += event.amount
            total_sent = sum(sent.values(), NO_ASSETS)
            assert sum(received.values(), NO_ASSETS) == total_sent
            expected = {u.address: net_flow[u.address] + received[u.address] for u in net.users}
            expected[a.address] -= routed
            expected[c.address] += routed
            for user in net.users:
                assert user.balance().user == expected[user.address]

            # Withdraw everything to fresh addresses, and the hub its collateral.
            recipients = {u.address: Signer(new_key()).address for u in net.users}
            for user in net.users:
                await user.withdraw(user.balance().user, recipients[user.address])
                assert user.balance().user == NO_ASSETS
            for user in net.users:
                left = hub.balance(user.address).hub
                if not left.is_zero():
                    await hub.reclaim_collateral(user.address, left)
                    await eventually(
                        lambda user=user: hub.balance(user.address).hub == NO_ASSETS,
                        "collateral reclaimed",
                    )
            for user in net.users:
                assert await net.onchain(recipients[user.address]) == expected[user.address]
            assert await hub.reserve() == reserve_before
            contract = await net.onchain(net.manager.address)
            assert contract == await hub.reserve()
