"""Signatures and hashes: the contract's views agree with protocols/, and every signature
check refuses a signature for another domain, by another key, or malformed."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from protocols.eip712 import Domain, channel_state_digest, thread_state_digest
from protocols.onchain import (
    GENESIS_RECORD,
    ChannelPhase,
    ChannelRecord,
    channel_state_abi,
    record_hash,
    thread_state_abi,
)
from protocols.thread_root import thread_leaf
from protocols.types import (
    UINT256_MAX,
    ZERO_ADDRESS,
    Address,
    Assets,
    ChannelState,
    ThreadState,
)
from tests.contracts.conftest import (
    ETHER,
    SECP256K1_N,
    Pair,
    build_pair,
    catch_up,
    exit_and_empty,
    fund,
    pay_thread,
    reverts_unchanged,
    thread,
    with_threads,
)
from tests.contracts.harness import Deployment

E = ETHER


# --- views --------------------------------------------------------------------------------------


def random_assets(rng: random.Random) -> Assets:
    pick = rng.choice([0, 1, rng.randrange(10**18), rng.randrange(2**255), UINT256_MAX // 2])
    return Assets(pick, rng.choice([0, rng.randrange(2**128), UINT256_MAX // 2]))


def random_address(rng: random.Random) -> Address:
    return Address(rng.randbytes(20))


def random_channel_state(rng: random.Random) -> ChannelState:
    return ChannelState(
        user=random_address(rng),
        recipient=random_address(rng),
        balance_hub=random_assets(rng),
        balance_user=random_assets(rng),
        pending_deposit_hub=random_assets(rng),
        pending_deposit_user=random_assets(rng),
        pending_withdrawal_hub=random_assets(rng),
        pending_withdrawal_user=random_assets(rng),
        tx_count_global=rng.randrange(2**256),
        tx_count_onchain=rng.randrange(2**64),
        thread_root=rng.randbytes(32),
        thread_count=rng.randrange(1000),
        timeout=rng.randrange(2**40),
    )


def random_thread_state(rng: random.Random) -> ThreadState:
    return ThreadState(
        thread_id=rng.randrange(2**256),
        sender=random_address(rng),
        receiver=random_address(rng),
        balance_sender=random_assets(rng),
        balance_receiver=random_assets(rng),
        tx_count=rng.randrange(2**256),
    )


def random_record(rng: random.Random) -> ChannelRecord:
    return ChannelRecord(
        held=random_assets(rng),
        balance_hub=random_assets(rng),
        balance_user=random_assets(rng),
        tx_count_global=rng.randrange(2**256),
        tx_count_onchain=rng.randrange(2**256),
        thread_root=rng.randbytes(32),
        thread_count=rng.randrange(2**256),
        exit_deadline=rng.randrange(2**256),
        phase=rng.choice(list(ChannelPhase)),
    )


def test_domain_separator_agrees(d: Deployment) -> None:
    assert bytes(d.manager.functions.domainSeparator().call()) == d.domain.separator
    assert d.domain.chain_id == d.w3.eth.chain_id
    assert d.domain.verifying_contract == Address.from_hex(d.manager.address)


def test_channel_state_digest_agrees(d: Deployment) -> None:
    rng = random.Random(1)
    states = [d.state(d.users[0])] + [random_channel_state(rng) for _ in range(8)]
    for state in states:
        onchain = d.manager.functions.channelStateDigest(channel_state_abi(state)).call()
        assert bytes(onchain) == channel_state_digest(d.domain, state)


def test_thread_state_digest_and_leaf_agree(d: Deployment) -> None:
    rng = random.Random(2)
    states = [thread(d.users[0], d.users[1], Assets(E, 1))]
    states += [random_thread_state(rng) for _ in range(8)]
    f = d.manager.functions
    for state in states:
        assert bytes(f.threadStateDigest(thread_state_abi(state)).call()) == thread_state_digest(
            d.domain, state
        )
        assert bytes(f.threadLeaf(thread_state_abi(state)).call()) == thread_leaf(state)


def test_record_hash_agrees(d: Deployment) -> None:
    rng = random.Random(3)
    f = d.manager.functions
    assert bytes(f.recordHash(GENESIS_RECORD.as_abi()).call()) == b"\x00" * 32
    assert record_hash(GENESIS_RECORD) == b"\x00" * 32
    records = [replace(GENESIS_RECORD, tx_count_global=1)]
    records += [random_record(rng) for _ in range(8)]
    for record in records:
        assert bytes(f.recordHash(record.as_abi()).call()) == record_hash(record)


# --- malformed signatures -----------------------------------------------------------------------


def parts(sig: bytes) -> tuple[int, int, int]:
    return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"), sig[64]


def make(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


def malformed(sig: bytes) -> Iterator[tuple[str, bytes]]:
    """Variants of a valid signature that the contract must refuse."""
    r, s, v = parts(sig)
    for bad_v in (0, 1, 26, 29, 255):
        yield f"v={bad_v}", make(r, s, bad_v)
    yield "high-s", make(r, SECP256K1_N - s, 55 - v)
    yield "zero-r", make(0, s, v)
    yield "zero-s", make(r, 0, v)
    yield "r=n", make(SECP256K1_N, s, v)
    yield "r=max", make(2**256 - 1, s, v)
    yield "empty", b""
    yield "64-bytes", sig[:64]
    yield "short", sig[:20]
    yield "zero", bytes(65)


@contextlib.contextmanager
def named(case: str) -> Iterator[None]:
    """Name the case in a failure."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{case}: {exc}") from exc


def ecrecover(d: Deployment, digest: bytes, sig: bytes) -> str:
    """What the EVM's ecrecover precompile makes of a signature ('' if nothing)."""
    r, s, v = parts(sig)
    data = digest + v.to_bytes(32, "big") + r.to_bytes(32, "big") + s.to_bytes(32, "big")
    out = bytes(d.w3.eth.call({"to": "0x" + "00" * 19 + "01", "data": data}))
    return "" if not out else Address(out[12:]).checksum()


def test_high_s_is_a_valid_ecdsa_signature_that_the_contract_refuses(d: Deployment) -> None:
    """The high-s twin recovers to the same key through the precompile, so refusing it is
    the contract's low-s rule at work (see the malformed-signature tests below)."""
    user = d.users[2]
    state = d.state(
        user,
        pending_deposit_user=Assets(1, 0),
        tx_count_global=1,
        tx_count_onchain=1,
        timeout=d.now + 100,
    )
    digest = channel_state_digest(d.domain, state)
    sig_hub, sig_user = d.sign(state)
    r, s, v = parts(sig_user)
    twin = make(r, SECP256K1_N - s, 55 - v)
    assert ecrecover(d, digest, sig_user) == user.hex
    assert ecrecover(d, digest, twin) == user.hex
    with reverts_unchanged(d, "bad user signature", [user]):
        d.user_update(state, sigs=(sig_hub, twin))
    d.user_update(state, sigs=(sig_hub, sig_user))


# --- channel states -----------------------------------------------------------------------------

# Entry points that check a double-signed channel state: (name, call(d, state, sigs)).
ChannelCall = Callable[[Deployment, ChannelState, tuple[bytes, bytes]], Any]


CHANNEL_CALLS: dict[str, ChannelCall] = {
    "hubAuthorizedUpdate": lambda d, s, sigs: d.hub_update(s, sigs=sigs),
    "userAuthorizedUpdate": lambda d, s, sigs: d.user_update(s, sigs=sigs),
    "startExitWithUpdate": lambda d, s, sigs: d.start_exit_with(s, sigs=sigs),
    "challengeExit": lambda d, s, sigs: d.challenge_exit(s, d.outsider, sigs=sigs),
}


def channel_setup(d: Deployment, entry: str) -> ChannelState:
    """A funded channel of users[2] and a state `entry` would accept from it."""
    user = d.users[2]
    confirmed = fund(d, user, Assets(2 * E, 200), Assets(E, 100))
    if entry == "challengeExit":
        d.start_exit(user)
    if entry in ("hubAuthorizedUpdate", "userAuthorizedUpdate"):
        return replace(
            confirmed,
            balance_user=Assets(E, 100),
            pending_withdrawal_user=Assets(E, 100),
            tx_count_global=confirmed.tx_count_global + 1,
            tx_count_onchain=2,
            timeout=d.now + 100,
        )
    return replace(confirmed, tx_count_global=confirmed.tx_count_global + 1)


@pytest.mark.parametrize("entry", sorted(CHANNEL_CALLS))
def test_channel_signatures_bound_to_domain_signers_and_user(d: Deployment, entry: str) -> None:
    call = CHANNEL_CALLS[entry]
    state = channel_setup(d, entry)
    user, other = d.users[2], d.users[3]
    other_chain = Domain(d.domain.chain_id + 1, d.domain.verifying_contract)
    other_contract = Domain(d.domain.chain_id, Address(b"\x11" * 20))
    good_hub, good_user = d.sign(state)
    # A state signed for user B, with the user field changed to A afterwards.
    for_other = replace(state, user=other.address, recipient=other.address)
    moved_hub, moved_user = d.sign(for_other, user=other)
    cases = [
        ("bad hub signature", d.sign(state, domain=other_chain)),
        ("bad hub signature", d.sign(state, domain=other_contract)),
        ("bad hub signature", (d.sign(state, domain=other_chain)[0], good_user)),
        ("bad user signature", (good_hub, d.sign(state, domain=other_chain)[1])),
        ("bad user signature", (good_hub, d.sign(state, domain=other_contract)[1])),
        ("bad user signature", d.sign(state, user=other)),
        ("bad user signature", d.sign(state, user=d.hub)),
        ("bad hub signature", d.sign(state, hub=user)),
        ("bad hub signature", d.sign(state, hub=d.outsider)),
        ("bad hub signature", (good_user, good_hub)),
        ("bad hub signature", (moved_hub, moved_user)),
        ("bad user signature", (good_hub, moved_user)),
    ]
    for reason, sigs in cases:
        with reverts_unchanged(d, reason, [user]):
            call(d, state, sigs)
    call(d, state, (good_hub, good_user))


@pytest.mark.parametrize("signer", ["hub", "user"])
@pytest.mark.parametrize("entry", sorted(CHANNEL_CALLS))
def test_malformed_channel_signatures(d: Deployment, entry: str, signer: str) -> None:
    call = CHANNEL_CALLS[entry]
    state = channel_setup(d, entry)
    good_hub, good_user = d.sign(state)
    good = good_hub if signer == "hub" else good_user
    for name, bad in malformed(good):
        sigs = (bad, good_user) if signer == "hub" else (good_hub, bad)
        with named(name), reverts_unchanged(d, f"bad {signer} signature", [d.users[2]]):
            call(d, state, sigs)
    call(d, state, (good_hub, good_user))


def test_state_of_another_user_goes_to_that_users_channel_only(d: Deployment) -> None:
    """A state names its channel: user A cannot run or exit B's state as its own."""
    a, b = d.users[2], d.users[3]
    fund(d, a, Assets(E, 10))
    conf_b = fund(d, b, Assets(2 * E, 20))
    later_b = replace(conf_b, tx_count_global=conf_b.tx_count_global + 1)
    with reverts_unchanged(d, "caller is not a party of the channel", [a, b]):
        d.start_exit_with(later_b, sender=a)
    pending_b = replace(
        later_b, pending_deposit_user=Assets(1, 0), tx_count_onchain=2, timeout=d.now + 100
    )
    with reverts_unchanged(d, "caller is not the channel's user", [a, b]):
        d.user_update(pending_b, sender=a)
    # Given A's record, B's state is checked against B's channel: A's record is not it.
    with reverts_unchanged(d, "record is not the channel's current record", [a, b]):
        d.hub_update(replace(pending_b, pending_deposit_user=Assets()), record=d.record(a))
    d.start_exit(b)
    with reverts_unchanged(d, "record is not the channel's current record", [a, b]):
        d.challenge_exit(later_b, d.outsider, record=d.record(a))


# --- thread states ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(deployment: Deployment) -> Iterator[Pair]:
    with deployment.snapshot():
        catch_up(deployment)
        yield build_pair(deployment)


@pytest.fixture
def p(prepared: Pair, d: Deployment) -> Pair:
    return prepared


ThreadCall = Callable[[Deployment, Pair, ThreadState, tuple[bytes, bytes]], Any]

THREAD_CALLS: dict[str, ThreadCall] = {
    "startThreadExitWithUpdate": lambda d, p, latest, sigs: d.start_thread_exit(
        p.a, p.t, (), latest=latest, sigs=sigs
    ),
    "challengeThread": lambda d, p, latest, sigs: d.challenge_thread(
        p.t, latest, d.outsider, sigs=sigs
    ),
}


def thread_setup(d: Deployment, p: Pair, entry: str) -> ThreadState:
    if entry == "challengeThread":
        d.start_thread_exit(p.b, p.t, ())
    return pay_thread(p.t, Assets(E // 3, 7), tx_count=3)


@pytest.mark.parametrize("entry", sorted(THREAD_CALLS))
def test_thread_signatures_bound_to_domain_and_parties(d: Deployment, p: Pair, entry: str) -> None:
    call = THREAD_CALLS[entry]
    latest = thread_setup(d, p, entry)
    other_chain = Domain(d.domain.chain_id + 7, d.domain.verifying_contract)
    other_contract = Domain(d.domain.chain_id, Address.from_hex(d.token.address))
    digest_signer = {
        "A": p.a,
        "B": p.b,
        "hub": d.hub,
        "C": d.users[2],
    }

    def sig(who: str, domain: Domain | None = None) -> bytes:
        return digest_signer[who].signer.sign_thread_state(domain or d.domain, latest).raw

    good = (sig("A"), sig("B"))
    cases = [
        ("bad sender signature", (sig("B"), sig("B"))),
        ("bad sender signature", (sig("hub"), sig("B"))),
        ("bad sender signature", (sig("B"), sig("A"))),
        ("bad receiver signature", (sig("A"), sig("A"))),
        ("bad receiver signature", (sig("A"), sig("hub"))),
        ("bad receiver signature", (sig("A"), sig("C"))),
        ("bad sender signature", d.sign_thread(latest, domain=other_chain)),
        ("bad sender signature", d.sign_thread(latest, domain=other_contract)),
        ("bad receiver signature", (sig("A"), sig("B", other_chain))),
        ("bad receiver signature", (sig("A"), sig("B", other_contract))),
        # A signature of another state of the same thread.
        ("bad sender signature", d.sign_thread(pay_thread(latest, Assets(1, 0)))),
    ]
    leaf = thread_leaf(p.t)
    for reason, sigs in cases:
        with reverts_unchanged(d, reason, [p.a], [leaf]):
            call(d, p, latest, sigs)
    call(d, p, latest, good)


@pytest.mark.parametrize("signer", ["sender", "receiver"])
@pytest.mark.parametrize("entry", sorted(THREAD_CALLS))
def test_malformed_thread_signatures(d: Deployment, p: Pair, entry: str, signer: str) -> None:
    call = THREAD_CALLS[entry]
    latest = thread_setup(d, p, entry)
    good_s, good_r = d.sign_thread(latest)
    leaf = thread_leaf(p.t)
    for name, bad in malformed(good_s if signer == "sender" else good_r):
        sigs = (bad, good_r) if signer == "sender" else (good_s, bad)
        with named(name), reverts_unchanged(d, f"bad {signer} signature", [p.a], [leaf]):
            call(d, p, latest, sigs)
    call(d, p, latest, (good_s, good_r))


def test_channel_signature_is_not_a_thread_signature(d: Deployment, p: Pair) -> None:
    """Different type hashes: A's and B's channel-state signatures do not sign a thread."""
    latest = pay_thread(p.t, Assets(1, 1))
    sig_a = d.sign(p.state_a)[1]
    sig_b = d.sign(p.state_b)[1]
    with reverts_unchanged(d, "bad sender signature", [p.a], [thread_leaf(p.t)]):
        d.start_thread_exit(p.a, p.t, (), latest=latest, sigs=(sig_a, sig_b))


def test_malformed_signature_never_stands_for_the_zero_address(d: Deployment) -> None:
    """A thread whose receiver is the zero address (in a root both channel parties signed).
    Whatever the contract recovers from a malformed signature must not count as a
    signature of the zero address (SPEC, Signature format: the contract checks that
    ecrecover's result is not the zero address). Here C would take the hub's lock.

    (Fails while `_recover` returns the zero address for malformed input and the result is
    compared with the expected signer as is.)"""
    c = d.users[2]
    x = ThreadState(
        thread_id=1,
        sender=c.address,
        receiver=ZERO_ADDRESS,
        balance_sender=Assets(E, 10),
        balance_receiver=Assets(E, 10),
        tx_count=0,
    )
    state = with_threads(fund(d, c, Assets(3 * E, 300), Assets(3 * E, 300)), [x])
    exit_and_empty(d, state)
    latest = replace(x, balance_sender=x.total(), balance_receiver=Assets(), tx_count=1)
    sig_c = c.signer.sign_thread_state(d.domain, latest).raw
    for name, bad in (("empty", b""), ("zero", bytes(65)), ("v=0", make(*parts(sig_c)[:2], 0))):
        with named(name), reverts_unchanged(d, "bad receiver signature", [c], [thread_leaf(x)]):
            d.start_thread_exit(c, x, (), latest=latest, sigs=(sig_c, bad))
    assert d.record(c).held == x.total()
