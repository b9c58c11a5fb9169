"""The embedding API: run a Weft node inside a trio program.

    async with open_node(settings) as node:
        await node.deposit(Assets(eth=10**18))
        key = await node.open_thread(peer_address, lock=Assets(eth=10**17))
        await node.pay(key, Assets(eth=1000))
        await node.close_thread(key)
        await node.withdraw(node.balance().user)

`open_node` starts the libp2p host, the peer manager, the chain watcher and submitter and the
engine in one nursery, and (unless `NodeSettings.backups` is off) gossip backups
(`node.backup`, as `Node.backups`); leaving the block stops them all, after a last backup
announcement on a clean stop. Every request waits until it is
done (double-signed, or executed on-chain where that is its point) and raises a `WeftError`
subclass when it cannot be: `InsufficientBalance`, `InsufficientCollateral` (with the amount
missing), `UnknownPeer`, `PeerOffline`, `HubOffline`, `ThreadClosing`, `RequestRefused`,
`ChainTransactionFailed`, `RequestTimeout`. `events()` yields what happens to the node
(payments received, threads opened and closed, deposits confirmed, collateral added).

A node that lost its store but kept its key recovers with `node.recover.recover_node`, or
here with `NodeSettings.recovery` (on an empty store only): the store is rebuilt from its
newest gossip backup before the node starts, then it resyncs with the hub and its peers.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node import engine as eng
from node.backup import (
    BACKUP_FILE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_OWNERS,
    BackupService,
    BackupSettings,
    open_backups,
)
from node.backup import DEFAULT_INTERVAL as DEFAULT_BACKUP_INTERVAL
from node.backup_store import published_sequence
from node.chain import ChainService, ManagerClient
from node.chain_errors import ChainError
from node.chain_worker import (
    ChainStatus,
    ChainSubmitter,
    ChainUpdate,
    ChainWatcher,
    SubmitFailed,
)
from node.host import (
    HUB_PROTOCOL,
    THREAD_PROTOCOL,
    Host,
    HostError,
    PeerUnreachable,
    open_host,
)
from node.peers import (
    PeerConnected,
    PeerDisconnected,
    PeerEvent,
    PeerManager,
    PeerMessages,
    PeerMisbehaved,
    PeerRef,
    PeerUnreachableEvent,
)
from node.peers import UnknownPeer as UnknownPeerAddress
from node.store import AsyncStore, open_store
from protocols import channel as ch
from protocols import roles
from protocols import thread as th
from protocols.effects import Receive
from protocols.messages import RejectReason, SignedThreadState
from protocols.signing import Signer
from protocols.types import NO_ASSETS, Address, Assets, ChannelState, Party, ThreadKey

if TYPE_CHECKING:
    from node.recover import RecoveryOptions, RecoveryReport

log = logging.getLogger("weft.node")

DEFAULT_TIMEOUT = 60.0  # seconds a request may take before RequestTimeout
STORE_FILE = "node.sqlite"
MAX_FINALS_KEPT = 1024  # final states of closed threads kept for close_thread's answer
EVENT_BUFFER = 10_000  # events kept for a slow `events()` reader; newer ones are dropped
COLLATERAL_RETRY = 0.1  # seconds before asking again while the channel is busy
RECONNECT_INTERVAL = 1.0  # seconds between attempts to reach thread peers that are gone
RECONNECT_TIMEOUT = 5.0
SUBMIT_ATTEMPTS = 5  # tries of a transaction the chain did not refuse (unreachable, timeout)
SUBMIT_BACKOFF = 1.0  # seconds before the second try, doubling
# Threads whose peer a user keeps a stream to: proposals and payments go back and forth.
# (An agreed thread waits for the hub, not for the peer.)
_LIVE_PHASES = (th.ThreadPhase.PROPOSED, th.ThreadPhase.OPEN, th.ThreadPhase.CLOSING)


# ---------------------------------------------------------------- errors


class WeftError(Exception):
    """A request the node could not do; the node itself goes on."""


class InsufficientBalance(WeftError):
    """My balance (channel or thread) does not cover the amount."""


class InsufficientCollateral(WeftError):
    """The hub lacks collateral for this; it was asked for more. `missing` is the shortfall."""

    def __init__(self, detail: str, missing: Assets) -> None:
        super().__init__(detail)
        self.missing = missing


class UnknownPeer(WeftError):
    """Neither this node nor the hub knows where the peer is."""


class PeerOffline(WeftError):
    """The peer cannot be reached now."""


class HubOffline(WeftError):
    """The hub cannot be reached now."""


class ThreadClosing(WeftError):
    """The thread is closing or closed: no new payments."""


class UnknownThread(WeftError):
    """This node has no such thread (never opened here, or closed long ago)."""


class RequestRefused(WeftError):
    """The peer, the hub or the protocol refused the request; `reason` says why."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.name}: {detail}")
        self.reason = reason
        self.detail = detail


class ChainTransactionFailed(WeftError):
    """The on-chain part of the request was not executed."""


class RequestTimeout(WeftError):
    """The request did not finish in time; it may still finish later."""


class NodeStopped(WeftError):
    """The node is not running."""


def _error_for(reason: RejectReason, detail: str, missing: Assets = NO_ASSETS) -> WeftError:
    if reason is RejectReason.INSUFFICIENT_BALANCE:
        return InsufficientBalance(detail)
    if reason is RejectReason.INSUFFICIENT_COLLATERAL:
        return InsufficientCollateral(detail, missing)
    if reason in (RejectReason.THREAD_CLOSING, RejectReason.THREAD_CLOSED):
        return ThreadClosing(f"{reason.name}: {detail}")
    if reason is RejectReason.NOT_EXECUTED_ONCHAIN:
        return ChainTransactionFailed(detail)
    return RequestRefused(reason, detail)


# ---------------------------------------------------------------- settings and events


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """How to run a node.

    `chain`: a `ChainService` shared with the caller (not closed by the node), or a JSON-RPC
    URL (the node opens and closes its own). `manager`: the ChannelManager's address;
    `deployed_block`: where to start reading its logs on a fresh store. `hub`: where a
    user's hub is (None for the hub itself). Policies: see `protocols.roles.NodeConfig`.
    """

    private_key: bytes
    data_dir: Path
    role: Party
    chain: ChainService | str
    manager: Address
    hub: PeerRef | None = None
    listen_port: int = 0
    deployed_block: int = 0
    max_lock: Assets = roles.UNLIMITED
    collateral_floor: Assets = NO_ASSETS
    collateral_ceiling: Assets = roles.UNLIMITED
    pending_timeout: int = roles.DEFAULT_PENDING_TIMEOUT
    poll_interval: float = 0.2
    tick_interval: float = 0.5
    # True: a commit that only records what peers already hold (a countersignature
    # received) does not wait for the disk; see SPEC.md, "Persistence".
    relaxed_commits: bool = False
    request_timeout: float = DEFAULT_TIMEOUT
    # Gossip backups (node.backup): announce my latest states at most every
    # `backup_interval` seconds (at once after a thread closes or a pending deposit or
    # withdrawal); keep the backups of at most `replica_max_owners` others, in at most
    # `replica_max_bytes` bytes. `backups=False`: neither (no gossip at all).
    backups: bool = True
    backup_interval: float = DEFAULT_BACKUP_INTERVAL
    replica_max_owners: int = DEFAULT_MAX_OWNERS
    replica_max_bytes: int = DEFAULT_MAX_BYTES
    # Recovery from the key alone (node.recover): on an empty store, first rebuild it from
    # the newest backup the hub or these peers hold. None: start a new node (the default).
    recovery: RecoveryOptions | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    """My channel as last double-signed: balances, and what the threads lock."""

    hub: Assets
    user: Assets
    pending_deposit_user: Assets
    pending_withdrawal_user: Assets
    open_threads: int
    tx_count: int


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    key: ThreadKey
    phase: th.ThreadPhase
    mine: Assets
    peer: Assets
    tx_count: int


@dataclass(frozen=True, slots=True)
class PeerMisbehavior:
    """Event: a peer broke the wire protocol; its stream was closed."""

    peer: Address
    detail: str


@dataclass(frozen=True, slots=True)
class ChainAvailability:
    """Event: the chain became unreachable, or reachable again."""

    available: bool
    detail: str


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None


class Payment:
    """A payment in flight (see `Node.start_payment`)."""

    def __init__(self, node: Node, key: ThreadKey, payment_id: int, amount: Assets) -> None:
        self._node = node
        self.key = key
        self.payment_id = payment_id
        self.amount = amount
        self._waiter = node._payments[payment_id]

    async def wait(self, timeout: float | None = None) -> int:
        """Wait until the peer countersigned; return the thread's tx_count. Raises like `pay`."""
        limit = self._node.settings.request_timeout if timeout is None else timeout
        with trio.move_on_after(limit):
            await self._waiter.done.wait()
        self._node._payments.pop(self.payment_id, None)
        result = self._waiter.result
        if isinstance(result, th.EventPaymentSent):
            return result.tx_count
        if isinstance(result, th.EventPaymentFailed):
            raise _error_for(result.reason, f"payment {self.payment_id} failed")
        raise RequestTimeout(f"payment {self.payment_id} not countersigned within {limit} s")


# ---------------------------------------------------------------- the node


class Node:
    """A running node; obtain one from `open_node`."""

    def __init__(
        self,
        settings: NodeSettings,
        signer: Signer,
        manager: ManagerClient,
        peers: PeerManager,
        engine: eng.Engine,
        watcher: ChainWatcher,
        submitter: ChainSubmitter,
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.address = signer.address
        self.manager = manager
        self.peers = peers
        self.engine = engine
        self.watcher = watcher
        self.submitter = submitter
        self._ops: dict[int, _Waiter] = {}
        self._payments: dict[int, _Waiter] = {}
        # Request and payment ids: above every id still in the loaded state, so an event of
        # a request made before a restart never answers a new one.
        self._ids = itertools.count(_highest_id(engine.state) + 1)
        self._subscribers: list[trio.MemorySendChannel[object]] = []
        self._finals: dict[ThreadKey, SignedThreadState] = {}  # closed, for close_thread
        self._running = True
        self.backups: BackupService | None = None
        """Gossip backups (None with `settings.backups` off)."""
        self.recovery: RecoveryReport | None = None
        """What the store was recovered from, if `open_node` recovered it."""

    # -- what the node is

    @property
    def is_hub(self) -> bool:
        return self.settings.role is Party.HUB

    @property
    def peer_ref(self) -> PeerRef:
        """Where this node can be reached (give it to users as their `hub`)."""
        return PeerRef.of_host(self.peers.host)

    @property
    def state(self) -> roles.NodeState:
        return self.engine.state

    def channel(self, user: Address | None = None) -> ChannelState:
        """The latest double-signed state of my channel (a hub: of `user`'s)."""
        side = self.state.channels.get(user or self.address)
        if side is None:
            raise WeftError(f"no channel with {user}")
        return side.latest.state

    def balance(self, user: Address | None = None) -> Balance:
        state = self.channel(user)
        return Balance(
            hub=state.balance_hub,
            user=state.balance_user,
            pending_deposit_user=state.pending_deposit_user,
            pending_withdrawal_user=state.pending_withdrawal_user,
            open_threads=state.thread_count,
            tx_count=state.tx_count_global,
        )

    def threads(self) -> list[ThreadInfo]:
        infos = []
        for key, side in self.state.threads.items():
            tip = side.latest.state if side.latest is not None else side.initial
            infos.append(
                ThreadInfo(
                    key,
                    side.phase,
                    tip.balance_of(self.address),
                    tip.balance_of(side.peer),
                    tip.tx_count,
                )
            )
        return infos

    def thread(self, key: ThreadKey) -> ThreadInfo:
        for info in self.threads():
            if info.key == key:
                return info
        raise UnknownThread(f"no thread {key}")

    # -- events

    async def events(self) -> AsyncIterator[object]:
        """Yield every event from now on: `protocols.roles.Event*`, the thread events
        (`EventPaymentReceived`, ...), `PeerMisbehavior`, `ChainAvailability`."""
        send, receive = trio.open_memory_channel[object](EVENT_BUFFER)
        self._subscribers.append(send)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            self._subscribers.remove(send)

    def _publish(self, event: object) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber.send_nowait(event)
            except trio.WouldBlock:
                log.warning("an events() reader is %d events behind; dropping", EVENT_BUFFER)

    def _on_event(self, event: object) -> None:
        if isinstance(event, roles.EventThreadClosed):
            self._finals[event.final.state.key] = event.final
            if len(self._finals) > MAX_FINALS_KEPT:
                del self._finals[next(iter(self._finals))]
        if isinstance(event, roles.EventOpDone | roles.EventOpFailed):
            waiter = self._ops.get(event.op_id)
            if waiter is not None:
                waiter.result = event
                waiter.done.set()
            return
        if isinstance(event, th.EventPaymentSent | th.EventPaymentFailed):
            waiter = self._payments.get(event.payment_id)
            if waiter is not None:
                waiter.result = event
                waiter.done.set()
        self._publish(event)

    # -- requests

    def _check_running(self) -> None:
        if not self._running:
            raise NodeStopped("the node has stopped")

    def _check_user(self) -> None:
        self._check_running()
        if self.is_hub:
            raise WeftError("a hub does not do this; it is a user's request")

    async def _need_hub(self) -> None:
        hub = self.settings.hub
        assert hub is not None
        if self.peers.is_connected(hub.address, HUB_PROTOCOL):
            return
        try:
            await self.peers.ensure(hub.address, HUB_PROTOCOL)
        except HostError as exc:
            raise HubOffline(f"hub {hub.address} is offline: {exc}") from exc

    async def _need_peer(self, peer: Address) -> None:
        if self.peers.is_connected(peer, THREAD_PROTOCOL):
            return
        try:
            await self.peers.ensure(peer, THREAD_PROTOCOL)
        except UnknownPeerAddress as exc:
            raise UnknownPeer(str(exc)) from exc
        except HostError as exc:
            raise PeerOffline(f"peer {peer} is offline: {exc}") from exc

    async def _request(
        self, make: Callable[[int], roles.NodeInput], timeout: float | None
    ) -> roles.EventOpDone:
        self._check_running()
        op_id = next(self._ids)
        waiter = self._ops[op_id] = _Waiter()
        limit = self.settings.request_timeout if timeout is None else timeout
        try:
            await self.engine.submit(make(op_id))
            with trio.move_on_after(limit):
                await waiter.done.wait()
        finally:
            self._ops.pop(op_id, None)
        result = waiter.result
        if isinstance(result, roles.EventOpDone):
            return result
        if isinstance(result, roles.EventOpFailed):
            raise _error_for(result.reason, result.detail, result.missing)
        raise RequestTimeout(f"request {op_id} did not finish within {limit} s")

    async def deposit(self, amount: Assets, *, timeout: float | None = None) -> None:
        """Deposit `amount` (wei, token units) into my channel; returns once confirmed.

        My account pays the ETH and, for tokens, approves the ChannelManager first.
        """
        self._check_user()
        await self._need_hub()
        await self._request(lambda op: roles.ActionDeposit(op, amount), timeout)

    async def withdraw(
        self, amount: Assets, recipient: Address | None = None, *, timeout: float | None = None
    ) -> None:
        """Withdraw `amount` of my channel balance to `recipient` (default: me)."""
        self._check_user()
        await self._need_hub()
        to = recipient or self.address
        await self._request(lambda op: roles.ActionWithdraw(op, amount, to), timeout)

    async def open_thread(
        self,
        peer: Address,
        lock: Assets,
        peer_lock: Assets = NO_ASSETS,
        *,
        timeout: float | None = None,
    ) -> ThreadKey:
        """Open a thread to `peer`, locking `lock` of mine (and `peer_lock` of theirs)."""
        self._check_user()
        await self._need_hub()
        await self._need_peer(peer)
        done = await self._request(
            lambda op: roles.ActionOpenThread(op, peer, lock, peer_lock), timeout
        )
        assert done.key is not None
        return done.key

    def start_payment(self, key: ThreadKey, amount: Assets) -> Payment:
        """Propose a payment now and return at once; `await payment.wait()` for the result.

        Many payments may be in flight on one thread (they share writes and commits). The
        node keeps each payment's outcome until `wait()` collects it: wait for every one.
        """
        self._check_user()
        payment_id = next(self._ids)
        self._payments[payment_id] = _Waiter()
        try:
            self.engine.submit_nowait(roles.ActionPayThread(key, payment_id, amount))
        except trio.WouldBlock:
            self._payments.pop(payment_id, None)
            raise WeftError("the node is overloaded: too many requests queued") from None
        return Payment(self, key, payment_id, amount)

    async def pay(self, key: ThreadKey, amount: Assets, *, timeout: float | None = None) -> int:
        """Pay `amount` over thread `key`; returns the thread's tx_count once countersigned."""
        self._check_user()
        side = self.state.threads.get(key)
        if side is None:
            if key in self._finals:
                raise ThreadClosing(f"thread {key} is closed")
            raise UnknownThread(f"no thread {key}")
        if side.phase in (th.ThreadPhase.CLOSING, th.ThreadPhase.FINAL):
            raise ThreadClosing(f"thread {key} is {side.phase.value}")
        await self._need_peer(side.peer)
        payment_id = next(self._ids)
        self._payments[payment_id] = _Waiter()
        await self.engine.submit(roles.ActionPayThread(key, payment_id, amount))
        return await Payment(self, key, payment_id, amount).wait(timeout)

    async def close_thread(
        self, key: ThreadKey, *, force: bool = False, timeout: float | None = None
    ) -> SignedThreadState:
        """Close thread `key`; returns once my channel settled it (the final state).

        `force`: without the peer, at my latest double-signed state.
        """
        self._check_user()
        await self._need_hub()
        await self._request(lambda op: roles.ActionCloseThread(op, key, force), timeout)
        final = self._finals.get(key)
        if final is None:
            raise WeftError(f"thread {key} closed but its final state was not reported")
        return final

    async def pay_via_hub(
        self, to: Address, amount: Assets, *, timeout: float | None = None
    ) -> None:
        """Pay user `to` through the hub (a payment in my channel, passed on in theirs)."""
        self._check_user()
        await self._need_hub()
        await self._request(lambda op: roles.ActionPayViaHub(op, to, amount), timeout)

    async def request_collateral(self, amount: Assets) -> None:
        """Ask the hub to hold at least `amount` in my channel (it decides, within its policy)."""
        self._check_user()
        await self._need_hub()
        await self._request(lambda op: roles.ActionRequestCollateral(op, amount), None)

    # -- hub requests

    def _check_hub(self) -> None:
        self._check_running()
        if not self.is_hub:
            raise WeftError("only the hub does this")

    async def deposit_reserve(self, amount: Assets) -> None:
        """Hub: move `amount` from my account into my reserve in the ChannelManager."""
        self._check_hub()
        try:
            await self.submitter.hub_deposit(amount)
        except ChainError as exc:
            raise ChainTransactionFailed(f"reserve deposit failed: {exc}") from exc

    async def reserve(self) -> Assets:
        """Hub: my reserve in the ChannelManager."""
        self._check_hub()
        return await self.submitter.reserve()

    async def collateralize(
        self, user: Address, amount: Assets, *, timeout: float | None = None
    ) -> Assets:
        """Hub: make my balance in `user`'s channel at least `amount` (within my floor and
        ceiling); returns my balance there once the deposits are confirmed."""
        self._check_hub()
        limit = self.settings.request_timeout if timeout is None else timeout
        send, receive = trio.open_memory_channel[object](EVENT_BUFFER)
        self._subscribers.append(send)
        try:
            with trio.move_on_after(limit):
                while True:
                    side = self.state.channels.get(user)
                    have = side.latest.state.balance_hub if side is not None else NO_ASSETS
                    if have.covers(amount):
                        return have
                    if self.state.coordination.collateral_for(user) is None:
                        await self.engine.submit(
                            roles.ActionCollateralize(user, have.shortfall(amount))
                        )
                    async for event in receive:
                        if isinstance(event, roles.EventCollateralAdded) and event.user == user:
                            break
                        if isinstance(event, roles.EventRejected) and event.sender == user:
                            if event.reason is not RejectReason.PENDING_OUTSTANDING:
                                raise RequestRefused(event.reason, event.detail)
                            await trio.sleep(COLLATERAL_RETRY)
                            break
        finally:
            self._subscribers.remove(send)
        raise RequestTimeout(f"collateral for {user} not confirmed within {limit} s")

    async def reclaim_collateral(self, user: Address, amount: Assets) -> None:
        """Hub: move `amount` of my balance in `user`'s channel back to my reserve."""
        self._check_hub()
        await self.engine.submit(roles.ActionReclaimCollateral(user, amount))


def _backup_settings(settings: NodeSettings) -> BackupSettings:
    try:
        return BackupSettings(
            interval=settings.backup_interval,
            max_owners=settings.replica_max_owners,
            max_bytes=settings.replica_max_bytes,
        )
    except ValueError as exc:
        raise WeftError(f"backup settings: {exc}") from None


def _highest_id(state: roles.NodeState) -> int:
    """The highest request or payment id in `state` (0 if none)."""
    ids = [op.op_id for op in state.coordination.ops]
    for side in state.threads.values():
        ids.extend(o.payment_id for o in side.outgoing)
        ids.extend(q.payment_id for q in side.queued)
    return max(ids, default=0)


# ---------------------------------------------------------------- running


async def node_config(
    settings: NodeSettings, signer: Signer, manager: ManagerClient
) -> roles.NodeConfig:
    """The protocol config of the node of `settings`, with the domain and hub read from the
    ChannelManager. Raises `WeftError` if the ChannelManager's hub is not the expected one."""
    domain = await manager.domain()
    hub_address = signer.address if settings.role is Party.HUB else settings.hub.address  # type: ignore[union-attr]
    onchain_hub = await manager.hub()
    if onchain_hub != hub_address:
        raise WeftError(f"the ChannelManager's hub is {onchain_hub}, not {hub_address}")
    return roles.NodeConfig(
        domain=domain,
        role=settings.role,
        me=signer.address,
        hub=hub_address,
        max_lock=settings.max_lock,
        collateral_floor=settings.collateral_floor,
        collateral_ceiling=settings.collateral_ceiling,
        pending_timeout=settings.pending_timeout,
    )


@asynccontextmanager
async def open_node(settings: NodeSettings) -> AsyncIterator[Node]:
    """Run a node until the block exits. See the module docstring.

    With `settings.recovery` and an empty store, the store is first rebuilt from the
    node's newest backup (`node.recover.recover_node`; its report is `Node.recovery`), and
    raises like it (`RecoveryFailed` and subclasses) if it cannot be; a store that holds a
    state is used as it is."""
    signer = Signer(settings.private_key)
    if (settings.role is Party.USER) != (settings.hub is not None):
        raise WeftError("a user node needs its hub's PeerRef; a hub node takes none")
    own_chain = isinstance(settings.chain, str)
    chain = (
        ChainService.from_url(settings.chain)
        if isinstance(settings.chain, str)
        else (settings.chain)
    )
    try:
        manager = chain.manager(settings.manager, deployed_block=settings.deployed_block)
        config = await node_config(settings, signer, manager)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        recovery = None
        if settings.recovery is not None:
            from node.recover import recover_node, store_is_empty

            if await store_is_empty(settings.data_dir):
                options = settings.recovery
                recovery = await recover_node(
                    settings,
                    options.peers,
                    timeout=options.timeout,
                    listen=options.listen,
                    allow_older=options.allow_older,
                )
                log.info("%s", recovery.describe())
            else:
                log.info("the store holds a state: no recovery needed")
        async with open_store(settings.data_dir / STORE_FILE) as store:
            loaded = eng.load(await store.load(), config)
            published = published_sequence(settings.data_dir / BACKUP_FILE)
            if loaded.fresh and published:
                # The store was lost (or a recovery was cut before writing it): starting
                # afresh could sign over states the node signed and backed up.
                raise WeftError(
                    f"the node's store in {settings.data_dir} is empty, but it published "
                    f"backup {published}: recover it from its backups (weft recover, or "
                    "NodeSettings.recovery) instead of starting afresh"
                )
            # A store with states but no record of the node's backups (backups.sqlite lost,
            # or backups were off): backups it published may hold sequences its new ones
            # must go above, which it cannot know. The wall clock in ms is above them.
            backup_floor = 0 if loaded.fresh or published else time.time_ns() // 1_000_000
            async with (
                open_host(settings.private_key, settings.listen_port) as host,
                _run_node(settings, signer, manager, host, store, loaded, backup_floor) as node,
            ):
                node.recovery = recovery
                yield node
    finally:
        if own_chain:
            chain.close()


@asynccontextmanager
async def _run_node(
    settings: NodeSettings,
    signer: Signer,
    manager: ManagerClient,
    host: Host,
    store: AsyncStore,
    loaded: eng.Loaded,
    backup_floor: int = 0,
) -> AsyncIterator[Node]:
    onchain_send, onchain_receive = trio.open_memory_channel[
        tuple[int, ch.ContractSendAuthorizedUpdate]
    ](math.inf)
    node_ref: list[Node] = []

    async def deliver_peer_event(event: PeerEvent) -> None:
        if isinstance(event, PeerMessages):
            await engine.submit(tuple(Receive(event.sender, m) for m in event.messages))
        elif isinstance(event, PeerConnected):
            await engine.submit(roles.ActionPeerReconnected(event.address))
        elif isinstance(event, PeerUnreachableEvent):
            await engine.submit(roles.ActionPeerUnreachable(event.address))
        elif isinstance(event, PeerMisbehaved):
            node_ref[0]._publish(PeerMisbehavior(event.address, event.detail))
        elif isinstance(event, PeerDisconnected) and event.protocol == THREAD_PROTOCOL:
            peer_lost.set()

    def on_event(event: object) -> None:
        if node_ref:
            node_ref[0]._on_event(event)

    peers = PeerManager(
        host,
        is_hub=settings.role is Party.HUB,
        hub=settings.hub,
        deliver=deliver_peer_event,
    )
    engine = eng.Engine(
        signer,
        loaded,
        store,
        peers.send,
        lambda seq, effect: onchain_send.send_nowait((seq, effect)),
        on_event,
        relaxed_commits=settings.relaxed_commits,
    )
    cursor = loaded.cursor if loaded.cursor is not None else settings.deployed_block
    watcher = ChainWatcher(manager, cursor, loaded.records)
    submitter = ChainSubmitter(manager, watcher, settings.private_key)
    node = Node(settings, signer, manager, peers, engine, watcher, submitter)
    node_ref.append(node)

    async def deliver_chain(update: ChainUpdate | ChainStatus) -> None:
        if isinstance(update, ChainStatus):
            node._publish(ChainAvailability(update.available, update.detail))
            return
        progress = eng.ChainProgress(
            eng.chain_inputs(update.executed, update.timestamp),
            update.cursor,
            tuple(update.records.items()),
            trio.Event(),
        )
        await engine.submit(progress)
        await progress.committed.wait()
        watcher.advance(update)

    async def perform_onchain() -> None:
        async for seq, effect in onchain_receive:
            result = await submitter.submit_authorized_update(effect.latest)
            backoff = SUBMIT_BACKOFF
            for _ in range(SUBMIT_ATTEMPTS - 1):
                # Not refused by the contract: the chain was unreachable or slow. Try again
                # (a transaction that was mined meanwhile is reported as already executed).
                if not isinstance(result, SubmitFailed) or result.revert:
                    break
                log.info("authorized update not sent (%s); again in %.0f s", result.reason, backoff)
                await trio.sleep(backoff)
                backoff *= 2
                result = await submitter.submit_authorized_update(effect.latest)
            if isinstance(result, SubmitFailed):
                log.warning("authorized update failed: %s", result.reason)
                state = effect.latest.state
                failed = roles.ContractReceiveTxFailed(
                    state.user, state.tx_count_onchain, result.reason
                )
                await engine.submit(failed)
            await engine.submit(eng.OutboxDone(seq))

    peer_lost = trio.Event()

    async def keep_thread_peers() -> None:
        """Keep a thread stream up to every peer I share an unfinished thread with (after
        a restart, or when a stream dropped), so that both sides resync."""
        nonlocal peer_lost
        while True:
            wanted = {
                side.peer for side in engine.state.threads.values() if side.phase in _LIVE_PHASES
            }
            for peer in wanted:
                if peers.is_connected(peer, THREAD_PROTOCOL):
                    continue
                with trio.move_on_after(RECONNECT_TIMEOUT):
                    try:
                        await peers.ensure(peer, THREAD_PROTOCOL)
                    except HostError as exc:
                        log.info("thread peer %s unreachable: %s", peer, exc)
            with trio.move_on_after(RECONNECT_INTERVAL):
                await peer_lost.wait()
                peer_lost = trio.Event()

    async def tick() -> None:
        while True:
            await trio.sleep(settings.tick_interval)
            await engine.submit(roles.ActionTick())

    for seq, effect in loaded.outbox:
        onchain_send.send_nowait((seq, effect))

    try:
        async with AsyncExitStack() as stack:
            if settings.backups:
                # Gossip rides on the host's connections (to the hub, to thread peers),
                # taken in whenever they come up: opened before any is dialed.
                backups = await stack.enter_async_context(
                    open_backups(
                        host,
                        settings.private_key,
                        loaded.state.config.domain,
                        settings.data_dir,
                        lambda: engine.state,
                        _backup_settings(settings),
                        floor=backup_floor,
                    )
                )
                node.backups = backups
                engine.on_commit = backups.notify
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                if loaded.state.coordination.recovered and loaded.cursor is None:
                    # Just recovered (node.recover): the current block and the channels'
                    # on-chain updates go in before any peer's sync (SPEC.md, "Recovery:
                    # restoring the machines", the runtime's part).
                    await nursery.start(watcher.run, deliver_chain, settings.poll_interval)
                    await nursery.start(peers.run)
                else:
                    await nursery.start(peers.run)
                    await nursery.start(watcher.run, deliver_chain, settings.poll_interval)
                nursery.start_soon(perform_onchain)
                nursery.start_soon(tick)
                if settings.role is Party.USER:
                    nursery.start_soon(keep_thread_peers)
                try:
                    yield node
                finally:
                    node._running = False
                    # A clean stop (not a task of the node failing): a last backup while
                    # the engine and the peer streams still run. Shielded and bounded.
                    if node.backups is not None and not nursery.cancel_scope.cancel_called:
                        await node.backups.final()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Give the caller its own exception back rather than a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


__all__ = [
    "Balance",
    "ChainAvailability",
    "ChainTransactionFailed",
    "HubOffline",
    "InsufficientBalance",
    "InsufficientCollateral",
    "Node",
    "NodeSettings",
    "NodeStopped",
    "Payment",
    "PeerMisbehavior",
    "PeerOffline",
    "PeerRef",
    "PeerUnreachable",
    "RequestRefused",
    "RequestTimeout",
    "ThreadClosing",
    "ThreadInfo",
    "UnknownPeer",
    "UnknownThread",
    "WeftError",
    "open_node",
]
