"""A local Weft network in one process: the embedded chain, a hub and users as real nodes.

    async with local_network(Path("/tmp/weft"), users=2) as net:
        alice, bob = net.users
        ...

Every node is a real `open_node` (a libp2p host on 127.0.0.1, its own SQLite store under
`root`, the chain watcher and submitter on the shared embedded chain), run in its own task,
like a process: it can be stopped and started again on its store. The contracts are
deployed fresh and every account is funded with ETH and test tokens
(`devnet.deploy.deploy_contracts`), and the hub deposits a reserve. Used by the README's
example and the integration tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

# ETHER, TOKENS and CHALLENGE_PERIOD also from here, for the integration tests.
from devnet.deploy import CHALLENGE_PERIOD as CHALLENGE_PERIOD
from devnet.deploy import ETHER as ETHER
from devnet.deploy import TOKENS as TOKENS
from devnet.deploy import deploy_contracts
from node.api import Node, NodeSettings, open_node
from node.chain import ChainService, ManagerClient, TokenClient
from node.cli import new_private_key
from protocols.signing import Signer
from protocols.types import Address, Assets, Party

if TYPE_CHECKING:
    # The trio stubs that libp2p brings in (trio-typing) keep TaskStatus there.
    from trio_typing import TaskStatus

DEFAULT_RESERVE = Assets(50 * ETHER, 10**22)

new_key = new_private_key  # the name tests.integration knows it by


@dataclass
class Slot:
    """One node's place in the network: its key, where it keeps its store, its run."""

    key: bytes
    name: str
    role: Party
    node: Node | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    crash_expected: bool = False  # set to keep a crash of this node from ending the network

    @property
    def address(self) -> Address:
        return Signer(self.key).address


@dataclass
class Network:
    chain: ChainService
    manager: ManagerClient
    token: TokenClient
    root: Path
    nursery: trio.Nursery
    hub_slot: Slot
    user_slots: list[Slot]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def hub(self) -> Node:
        assert self.hub_slot.node is not None, "the hub is not running"
        return self.hub_slot.node

    @property
    def users(self) -> list[Node]:
        nodes = [slot.node for slot in self.user_slots]
        assert all(n is not None for n in nodes), "a user is not running"
        return nodes  # type: ignore[return-value]

    def settings(self, slot: Slot, **extra: Any) -> NodeSettings:
        hub_ref = None
        if slot.role is Party.USER:
            hub_ref = self.hub_ref
        base = NodeSettings(
            private_key=slot.key,
            data_dir=self.root / slot.name,
            role=slot.role,
            chain=self.chain,
            manager=self.manager.address,
            hub=hub_ref,
            deployed_block=self.manager.deployed_block or 0,
            poll_interval=0.05,
            request_timeout=30.0,
        )
        return replace(base, **{**self.overrides, **extra})

    hub_ref: Any = None

    async def start(self, slot: Slot, **extra: Any) -> Node:
        """Run the node of `slot` (again, on its store) in its own task."""
        slot.stop = trio.Event()
        slot.finished = trio.Event()
        slot.error = None
        if slot.role is Party.HUB and self.hub_ref is not None:
            # Users know their hub by its address: a hub comes back on the same port.
            extra = {"listen_port": _port_of(self.hub_ref), **extra}
        settings = self.settings(slot, **extra)
        node: Node = await self.nursery.start(_run_slot, slot, settings)
        if slot.role is Party.HUB:
            self.hub_ref = node.peer_ref
        return node

    async def stop(self, slot: Slot) -> None:
        """Stop the node of `slot` cleanly and wait until it is down."""
        slot.stop.set()
        await slot.finished.wait()

    async def wait_down(self, slot: Slot) -> BaseException | None:
        """Wait until the node of `slot` is down (e.g. after a crash); return its error."""
        await slot.finished.wait()
        return slot.error

    async def restart(self, slot: Slot, **extra: Any) -> Node:
        if slot.node is not None:
            await self.stop(slot)
        return await self.start(slot, **extra)

    async def onchain(self, who: Address) -> Assets:
        """ETH and tokens `who` holds on-chain."""
        return Assets(await self.chain.eth_balance(who), await self.token.balance_of(who))


def _port_of(ref: Any) -> int:
    for multiaddr in ref.multiaddrs:
        parts = multiaddr.split("/")
        if "tcp" in parts:
            return int(parts[parts.index("tcp") + 1])
    raise ValueError(f"no TCP port in {ref.multiaddrs}")


async def _run_slot(slot: Slot, settings: NodeSettings, *, task_status: TaskStatus[Node]) -> None:
    try:
        async with open_node(settings) as node:
            slot.node = node
            task_status.started(node)
            await slot.stop.wait()
    except* Exception as group:
        if not slot.crash_expected:
            raise
        slot.error = group.exceptions[0]
    finally:
        slot.crash_expected = False
        slot.node = None
        slot.finished.set()


@asynccontextmanager
async def local_network(
    root: Path, users: int = 3, *, reserve: Assets = DEFAULT_RESERVE, **overrides: Any
) -> AsyncIterator[Network]:
    """Deploy the contracts on a fresh embedded chain, fund the accounts, start the nodes."""
    chain = ChainService.embedded()
    try:
        hub = Slot(new_private_key(), "hub", Party.HUB)
        slots = [Slot(new_private_key(), f"user{i}", Party.USER) for i in range(users)]
        token, manager = await deploy_contracts(chain, hub.key, [slot.key for slot in slots])
        async with trio.open_nursery() as nursery:
            net = Network(chain, manager, token, root, nursery, hub, slots, overrides)
            await net.start(hub)
            if not reserve.is_zero():
                await net.hub.deposit_reserve(reserve)
            for slot in slots:
                await net.start(slot)
            try:
                yield net
            finally:
                for slot in (*slots, hub):
                    slot.stop.set()
    finally:
        chain.close()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait until `check()` holds (polling); fail the test with `what` if it never does."""
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"never happened within {timeout} s: {what}")
