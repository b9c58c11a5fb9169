"""The engine: one task steps inputs, commits, and only then performs the effects.

A user node's engine on a real store, with the peer side and the chain faked by recorders:
every message is sent only after the commit that holds the signature it carries; a commit
is fsynced exactly when something leaves the node; inputs queued together are one commit;
a restart from the store alone gives back the same state; a store of another node is
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from node import engine as eng
from node.store import Batch, Store, open_store
from protocols import channel as ch
from protocols import roles
from protocols.eip712 import Domain
from protocols.messages import ChannelProposal
from protocols.signing import Signer
from protocols.types import Address, Assets, Party

USER = Signer(b"\x11" * 32)
HUB = Signer(b"\x22" * 32)
DOMAIN = Domain(1337, Address(b"\xcc" * 20))
CONFIG = roles.NodeConfig(DOMAIN, Party.USER, USER.address, HUB.address)


class Recorder:
    """Stands in for the peer manager, the chain task and the API; notes what the store
    held when each effect was performed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: list[tuple[Address, object, dict[str, bytes]]] = []
        self.onchain: list[int] = []
        self.events: list[object] = []

    def send(self, to: Address, message: object) -> None:
        self.sent.append((to, message, self.store.load().states))

    def submit_onchain(self, seq: int, effect: ch.ContractSendAuthorizedUpdate) -> None:
        self.onchain.append(seq)

    def on_event(self, event: object) -> None:
        self.events.append(event)


async def run_engine(
    path: Path,
    inputs: list[roles.NodeInput],
    config: roles.NodeConfig = CONFIG,
    *,
    relaxed: bool = True,
) -> tuple[eng.Engine, Recorder, list[bool]]:
    flags: list[bool] = []  # the `durable` of each commit, in order
    async with open_store(path) as store:
        real_commit = store.sync.commit

        def spy(batch: Batch, *, durable: bool = True) -> tuple[int, ...]:
            flags.append(durable)
            return real_commit(batch, durable=durable)

        store.sync.commit = spy  # type: ignore[method-assign]
        loaded = eng.load(await store.load(), config)
        recorder = Recorder(store.sync)
        engine = eng.Engine(
            USER,
            loaded,
            store,
            recorder.send,
            recorder.submit_onchain,
            recorder.on_event,
            relaxed_commits=relaxed,
        )
        stepped = trio.Event()
        perform = engine._perform

        def perform_and_count(*args: Any) -> None:
            perform(*args)
            if engine.steps >= len(inputs):
                stepped.set()

        engine._perform = perform_and_count  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            for item in inputs:
                engine.submit_nowait(item)
            with trio.fail_after(10):
                await stepped.wait()
            nursery.cancel_scope.cancel()
        return engine, recorder, flags


async def test_sends_only_after_a_durable_commit_of_what_they_carry(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    block = ch.ContractReceiveBlock(1_000)
    deposit = roles.ActionDeposit(1, Assets(10, 0))
    engine, recorder, durable = await run_engine(path, [block])
    # A block only moves the clock: committed, but nothing left the node, so no fsync.
    assert durable == [False]
    assert recorder.sent == []
    engine, recorder, durable = await run_engine(path, [deposit])
    ((to, message, stored),) = recorder.sent
    assert to == HUB.address and isinstance(message, ChannelProposal)
    assert durable == [True]
    # When the proposal was sent, the store already held the channel with it in flight.
    side = eng.state_codec.decode(stored[eng.channel_key(USER.address)])
    assert isinstance(side, ch.ChannelSide)
    assert side.outgoing is not None and side.outgoing.signature == message.signature
    assert engine.state.channels[USER.address] == side


async def test_without_relaxed_commits_every_commit_waits_for_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    _, _, durable = await run_engine(path, [ch.ContractReceiveBlock(1_000)], relaxed=False)
    assert durable == [True]


async def test_inputs_queued_together_are_one_commit(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    blocks = [ch.ContractReceiveBlock(1_000 + i) for i in range(50)]
    engine, _, _ = await run_engine(path, blocks)
    assert engine.steps == 50
    assert engine.commits == 1
    assert engine.state.now == 1_049


async def test_restart_from_the_store_alone_gives_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    first, _, _ = await run_engine(
        path, [ch.ContractReceiveBlock(5_000), roles.ActionDeposit(7, Assets(3, 4))]
    )
    second, recorder, durable = await run_engine(path, [roles.ActionTick()])
    assert second.state.channels == first.state.channels
    assert second.state.coordination == first.state.coordination
    assert durable == []  # a tick that changes nothing writes nothing
    assert recorder.sent == []


async def test_a_store_of_another_node_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    await run_engine(path, [ch.ContractReceiveBlock(1)])
    other = roles.NodeConfig(DOMAIN, Party.USER, HUB.address, USER.address)
    with Store(path) as store, pytest.raises(eng.EngineError, match="another node"):
        eng.load(store.load(), other)
    moved = roles.NodeConfig(
        Domain(1338, DOMAIN.verifying_contract), Party.USER, USER.address, HUB.address
    )
    with Store(path) as store, pytest.raises(eng.EngineError, match="another node"):
        eng.load(store.load(), moved)


async def test_an_input_that_makes_the_protocol_raise_is_dropped_and_the_rest_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = roles._Run.on_user_action

    def broken(self: roles._Run, event: object) -> None:
        if isinstance(event, roles.ActionWithdraw):
            raise RuntimeError("a bug")
        real(self, event)

    monkeypatch.setattr(roles._Run, "on_user_action", broken)
    bad = roles.ActionWithdraw(1, Assets(1, 0), USER.address)
    good = roles.ActionDeposit(2, Assets(1, 0))
    _, recorder, _ = await run_engine(tmp_path / "node.sqlite", [bad, good])
    assert any(isinstance(e, eng.EngineInputDropped) for e in recorder.events)
    assert len(recorder.sent) == 1  # the deposit's proposal
