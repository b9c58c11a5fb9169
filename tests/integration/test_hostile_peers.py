"""A peer that sends forged, stale, replayed or equivocating states is refused; the thread
goes on, and no balance moves but by what was properly agreed.

User B is the hostile one: besides its honest node, the test signs with B's key and puts
messages on B's streams to A directly, as a modified client would.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

import trio

from node.host import THREAD_PROTOCOL, open_host
from protocols import roles
from protocols.messages import (
    ChannelSync,
    RejectReason,
    SignedThreadState,
    ThreadProposal,
    ThreadSync,
)
from protocols.signing import Signer
from protocols.types import Assets, ThreadKey, ThreadState
from tests.integration.network import ETHER, Network, eventually, local_network, new_key

DEPOSIT = Assets(ETHER, 10**21)
LOCK = Assets(ETHER // 4, 10**20)


async def open_thread(net: Network) -> ThreadKey:
    a, b = net.users
    for user in (a, b):
        await user.deposit(DEPOSIT)
        await net.hub.collateralize(user.address, LOCK)
    return await a.open_thread(b.address, LOCK, LOCK)


def b_pays(state: ThreadState, amount: Assets, tx_count: int) -> ThreadState:
    """`state` with the receiver B paying `amount` to A."""
    return replace(
        state,
        balance_sender=state.balance_sender + amount,
        balance_receiver=state.balance_receiver - amount,
        tx_count=tx_count,
    )


async def test_forged_stale_replayed_and_equivocating_states_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            key = await open_thread(net)
            a, b = net.users
            domain = a.state.config.domain
            b_signer = Signer(net.user_slots[1].key)
            stranger = Signer(new_key())
            for _ in range(3):
                await a.pay(key, Assets(100, 1))
            for _ in range(2):
                await b.pay(key, Assets(10, 0))
            latest = a.state.threads[key].latest
            assert latest is not None and latest.state.tx_count == 5
            base = latest.state
            rejected: list[roles.EventRejected] = []

            async def watch() -> None:
                async for event in a.events():
                    if isinstance(event, roles.EventRejected) and event.sender == b.address:
                        rejected.append(event)

            def propose(state: ThreadState, prev: int, signer: Signer) -> ThreadProposal:
                return ThreadProposal(state, prev, signer.sign_thread_state(domain, state))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await trio.sleep(0.05)
                send = b.peers.send
                # Forged: B's payment signed by someone else.
                send(a.address, propose(b_pays(base, Assets(1, 0), 6), 5, stranger))
                # Money moving toward the proposer: B taking A's balance.
                send(a.address, propose(b_pays(base, Assets(0, 0), 6), 5, b_signer))
                grab = replace(
                    base,
                    balance_sender=base.balance_sender - Assets(50, 0),
                    balance_receiver=base.balance_receiver + Assets(50, 0),
                    tx_count=6,
                )
                send(a.address, propose(grab, 5, b_signer))
                # Stale: a state below A's latest, properly signed by B.
                send(a.address, propose(b_pays(base, Assets(3, 0), 3), 2, b_signer))
                # Replayed: B's own last proposal again (A holds it as latest).
                send(
                    a.address,
                    ThreadProposal(base, 4, b_signer.sign_thread_state(domain, base)),
                )
                # A sync claiming everything for B, with A's signature forged.
                everything = replace(
                    base,
                    balance_sender=Assets(0, 0),
                    balance_receiver=base.total(),
                    tx_count=100,
                )
                forged_sync = SignedThreadState(
                    everything,
                    stranger.sign_thread_state(domain, everything),
                    b_signer.sign_thread_state(domain, everything),
                )
                send(a.address, ThreadSync(forged_sync))
                # Equivocation: two different states with the same tx_count.
                send(a.address, propose(b_pays(base, Assets(1, 0), 6), 5, b_signer))
                send(a.address, propose(b_pays(base, Assets(2, 0), 6), 5, b_signer))
                reasons_wanted = {
                    RejectReason.BAD_SIGNATURE,
                    RejectReason.EMPTY_PAYMENT,
                    RejectReason.INVALID_TRANSITION,
                    RejectReason.STALE_NONCE,
                }
                await eventually(
                    lambda: reasons_wanted <= {r.reason for r in rejected} and len(rejected) >= 6,
                    "A refused every bad message",
                )
                nursery.cancel_scope.cancel()
            side = a.state.threads[key]
            assert side.latest is not None
            # Of all that, A took exactly one state: the first of the two equivocating ones.
            assert side.latest.state == b_pays(base, Assets(1, 0), 6)
            # The forged sync was refused twice over (A's signature), counted among them.
            assert sum(r.reason is RejectReason.BAD_SIGNATURE for r in rejected) >= 2

            # The thread goes on: B's node (which never saw its key sign tx 6) resyncs on a
            # new stream and both keep paying.
            await net.restart(net.user_slots[1])
            a, b = net.users
            await eventually(
                lambda: b.state.threads[key].latest == a.state.threads[key].latest,
                "B adopted the state A countersigned",
            )
            await b.pay(key, Assets(5, 0))
            await a.pay(key, Assets(7, 0))
            final = await a.close_thread(key)
            assert final.state.balance_receiver == LOCK + Assets(300 - 20 - 1 - 5 + 7, 3)


async def test_garbage_and_forged_channel_sync_leave_nodes_serving(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with local_network(tmp_path, users=2) as net:
            key = await open_thread(net)
            a, b = net.users
            misbehaved: list[object] = []
            hub_rejected: list[roles.EventRejected] = []

            async def watch_a() -> None:
                async for event in a.events():
                    if type(event).__name__ == "PeerMisbehavior":
                        misbehaved.append(event)

            async def watch_hub() -> None:
                async for event in net.hub.events():
                    if isinstance(event, roles.EventRejected):
                        hub_rejected.append(event)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_a)
                nursery.start_soon(watch_hub)
                await trio.sleep(0.05)
                # A stranger dials A and writes bytes that are not a message.
                async with open_host(new_key()) as rogue:
                    ref = a.peer_ref
                    await rogue.connect(ref.peer_id, ref.multiaddrs)
                    stream = await rogue.new_stream(ref.peer_id, THREAD_PROTOCOL)
                    await stream.send(secrets.token_bytes(64))
                    await eventually(lambda: bool(misbehaved), "A reported the garbage")
                # B tells the hub its channel is at a state the hub never signed.
                state = b.channel()
                fake = replace(
                    state,
                    balance_user=state.balance_user + Assets(ETHER, 0),
                    tx_count_global=state.tx_count_global + 1,
                )
                b_signer = Signer(net.user_slots[1].key)
                domain = b.state.config.domain
                sig = b_signer.sign_channel_state(domain, fake)
                b.peers.send(net.hub.address, ChannelSync(fake, sig, sig, ()))
                await eventually(
                    lambda: any(r.reason is RejectReason.BAD_SIGNATURE for r in hub_rejected),
                    "the hub refused the forged sync",
                )
                nursery.cancel_scope.cancel()
            assert net.hub.channel(b.address) == state
            # Both still serve: a payment and a close go through.
            await a.pay(key, Assets(1, 1))
            final = await a.close_thread(key)
            assert final.state.tx_count == 1
