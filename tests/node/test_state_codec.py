"""The state codec (node.state_codec): round trips of real machine states and of every
registered type, canonical encodings, refusals, and decode fuzzing."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from enum import Enum, IntEnum
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.state_codec import CODEC_TYPES, CodecError, decode, encode, type_name
from protocols import roles
from protocols.channel import (
    ActionProposeUpdate,
    ActionReconnected,
    ChannelSide,
    ContractReceiveBlock,
    EventChannelSynced,
    EventUpdateFailed,
    OutgoingUpdate,
    SignedChannelState,
)
from protocols.effects import Rejection, Transition
from protocols.eip712 import Domain
from protocols.messages import RejectReason, SignedThreadState, UpdatePayment
from protocols.onchain import ChannelPhase, ChannelRecord, Payout, ThreadDispute
from protocols.thread import (
    ActionCloseThread,
    ActionConfirmLock,
    ActionPay,
    EventPaymentFailed,
    EventThreadAgreed,
    EventThreadOpenRefused,
    Outgoing,
    Queued,
    ThreadPhase,
    ThreadSide,
    propose_thread,
)
from protocols.thread import ActionReconnected as ThreadReconnected
from protocols.types import (
    UINT256_MAX,
    Address,
    Assets,
    ChannelState,
    Party,
    Signature,
    ThreadKey,
    ThreadState,
)
from tests.protocols import test_channel_machine as cm
from tests.protocols import test_thread_machine as tm
from tests.protocols.pair import Pair
from tests.protocols.strategies import (
    MESSAGE_STRATEGIES,
    UPDATE_STRATEGIES,
    addresses,
    assets,
    channel_states,
    signatures,
    signed_thread_states,
    thread_keys,
    thread_states,
    uint256s,
)

# ---------------------------------------------------------------- helpers


def registered_types_in(value: object) -> set[type]:
    """Every registered class that occurs in `value` (walking fields, tuples, sets)."""
    found: set[type] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) in (tuple, frozenset):
            stack.extend(item)  # type: ignore[arg-type]
        elif type_name(type(item)) in CODEC_TYPES:
            found.add(type(item))
            if dataclasses.is_dataclass(item):
                stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    return found


def assert_round_trips(value: object) -> bytes:
    data = encode(value)
    back = decode(data)
    assert back == value
    assert type(back) is type(value)
    assert encode(back) == data
    return data


class Checked:
    """Wraps a pair's step function: every input, new state and effect must round-trip."""

    def __init__(self) -> None:
        self.seen: set[type] = set()
        self.states: list[object] = []

    def check(self, value: object) -> None:
        assert_round_trips(value)
        self.seen |= registered_types_in(value)

    def wrap(self, pair: Pair) -> Pair:
        inner = pair.step_fn

        def step(state: Any, event: Any, signer: Any) -> Transition[Any]:
            self.check(event)
            result = inner(state, event, signer)
            self.check(result)  # state, effects and rejection in one value
            self.states.append(result.state)
            return result

        pair.step_fn = step
        return pair


def channel_scenario(checked: Checked) -> None:
    """Deposit, payments (queued and in flight), reconnect, thread open and close."""
    recorder = cm.Recorder()
    pair_a = checked.wrap(cm.channel_pair(cm.USER_A_KEY, recorder=recorder)[0])
    pair_b = checked.wrap(cm.channel_pair(cm.USER_B_KEY, recorder=recorder)[0])
    cm.fund(pair_a, user=Assets(100, 10), hub=Assets(60, 6))
    cm.fund(pair_b, user=Assets(50, 5), hub=Assets(120, 12))
    cm.propose(pair_a, pair_a.b, cm.pay(Party.USER, Assets(5, 1)))
    cm.propose(pair_a, pair_a.a, cm.pay(Party.HUB, Assets(2, 0)))
    # Two proposals at once: one in flight, one queued; then a lost link and a resync.
    pair_a.input(pair_a.b, ActionProposeUpdate(cm.pay(Party.USER, Assets(1, 0))))
    pair_a.input(pair_a.b, ActionProposeUpdate(cm.pay(Party.USER, Assets(1, 0))))
    assert pair_a.b.state.outgoing is not None and pair_a.b.state.queued
    pair_a.drop_in_flight()
    for end in (pair_a.a, pair_a.b):
        pair_a.input(end, ActionReconnected())
    pair_a.drain()
    cm.block(pair_a, 1_000)
    # A refused payment (more than the balance) and a thread through both channels.
    pair_a.input(pair_a.b, ActionProposeUpdate(cm.pay(Party.USER, Assets(10**6, 0))))
    pair_a.drain()
    initial = cm.double_sign(cm.thread_initial(Assets(30, 3), Assets(20, 2)))
    cm.propose(pair_a, pair_a.a, cm.open_update(initial))
    cm.propose(pair_b, pair_b.b, cm.open_update(initial))
    final = cm.double_sign(
        dataclasses.replace(
            initial.state, balance_sender=Assets(18, 2), balance_receiver=Assets(32, 3), tx_count=5
        )
    )
    cm.propose(pair_a, pair_a.b, cm.close_update(final))
    cm.propose(pair_b, pair_b.a, cm.close_update(final))
    assert pair_a.a.state.closed_threads  # a frozenset of thread keys was stored


def thread_scenario(checked: Checked) -> None:
    """Open, pipelined payments both ways with a full window, reconnect, close."""
    proposed = propose_thread(tm.DOMAIN, tm.FORGE_A, tm.make_initial(), window=2)
    checked.check(proposed)
    pair = checked.wrap(tm.open_pair(window=2)[0])
    a, b = pair.a, pair.b
    for payment_id in range(1, 5):
        pair.input(a, ActionPay(payment_id, Assets(3, 0)))
    assert len(a.state.outgoing) == 2 and a.state.queued
    pair.input(b, ActionPay(10, Assets(1, 1)))
    pair.deliver(b, 1)
    pair.drop_in_flight()
    for end in (a, b):
        pair.input(end, ThreadReconnected())
    pair.drain()
    pair.input(a, ActionPay(11, Assets(10**9, 0)))  # refused: insufficient balance
    pair.input(a, ActionCloseThread())
    pair.drain()
    assert a.state.phase is ThreadPhase.FINAL


@functools.cache
def scenario_results() -> tuple[frozenset[type], tuple[object, ...]]:
    checked = Checked()
    channel_scenario(checked)
    thread_scenario(checked)
    return frozenset(checked.seen), tuple(checked.states)


# Values of the registered types that the scenarios and strategies do not reach.
SAMPLES: tuple[object, ...] = (
    ChannelRecord(),
    ChannelRecord(
        held=Assets(UINT256_MAX, 1),
        tx_count_global=2**64,
        thread_root=b"\x01" * 32,
        exit_deadline=7,
        phase=ChannelPhase.SETTLING_THREADS,
    ),
    ThreadDispute(Assets(1, 2), Assets(3, 4), 5, 6, True),
    Payout(Assets(1, 0), Assets(0, 1)),
    EventUpdateFailed(
        UpdatePayment(Party.HUB, Assets(1), Address(b"\x00" * 20)), RejectReason.POLICY, "no"
    ),
    EventThreadOpenRefused(
        ThreadKey(Address(b"\x01" * 20), Address(b"\x02" * 20), 3), RejectReason.LOCK_REFUSED, ""
    ),
    EventPaymentFailed(
        ThreadKey(Address(b"\x01" * 20), Address(b"\x02" * 20), 3), 9, RejectReason.THREAD_CLOSED
    ),
    ActionCloseThread(force=True),
    ContractReceiveBlock(2**40),
    Transition(None, (), Rejection(RejectReason.NOT_SUCCESSOR, "x")),
    Domain(2**200, Address(b"\x33" * 20), name="Other ☃", version=""),
)


# ---------------------------------------------------------------- real machine states


def test_every_state_of_the_scenarios_round_trips() -> None:
    seen, states = scenario_results()
    assert len(states) > 100
    # The machines' state types and everything inside them were reached.
    for cls in (
        ChannelSide,
        SignedChannelState,
        OutgoingUpdate,
        ThreadSide,
        Outgoing,
        Queued,
        ThreadPhase,
        Domain,
        ChannelState,
        ThreadState,
        ThreadKey,
        Assets,
        Address,
        Signature,
        Party,
        RejectReason,
    ):
        assert cls in seen, cls


def role_samples(signed: SignedThreadState) -> tuple[object, ...]:
    """One value of every type of `protocols.roles` that a node stores or passes around."""
    a, b = Address(b"\x01" * 20), Address(b"\x02" * 20)
    key = signed.state.key
    pending = UpdatePayment(Party.USER, Assets(5, 6), b)
    coordination = roles.Coordination(
        ops=(roles.Op(1, roles.OpKind.DEPOSIT, pending, key, 7),),
        openings=(roles.ThreadOpening(signed, roles.OpenStage.LOCK_SENDER),),
        closings=(roles.ThreadClosing(signed, (b, a), fixed=True, waiting=True),),
        forwards=(roles.Forward(a, b, Assets(1, 2)),),
        paying=(roles.Forward(b, a, Assets(3, 4)),),
        collateral=((a, Assets(3, 4)),),
        invalidating=frozenset({(a, 3)}),
        now=2**33,
        last_thread_id=2**70,
        confirm_retry=frozenset({(b, 2)}),
    )
    domain = Domain(1, Address(b"\x33" * 20))
    return (
        coordination,
        roles.NodeConfig(domain, Party.HUB, a, a, collateral_floor=Assets(1, 1)),
        roles.ActionDeposit(1, Assets(1, 0)),
        roles.ActionWithdraw(2, Assets(0, 1), b),
        roles.ActionOpenThread(3, b, Assets(1, 1), Assets()),
        roles.ActionPayThread(key, 4, Assets(1, 0)),
        roles.ActionCloseThread(5, key, force=True),
        roles.ActionPayViaHub(6, b, Assets(1, 0)),
        roles.ActionRequestCollateral(7, Assets(0, 9)),
        roles.ActionCollateralize(b, Assets(9, 9)),
        roles.ActionReclaimCollateral(b, Assets(9, 9)),
        roles.ActionPeerReconnected(b),
        roles.ActionPeerUnreachable(b),
        roles.ActionTick(),
        roles.ContractReceiveTxFailed(a, 3, "reverted"),
        roles.EventOpDone(1, key),
        roles.EventOpFailed(2, RejectReason.INSUFFICIENT_COLLATERAL, "short", Assets(1, 2)),
        roles.EventDepositConfirmed(a, Assets(1, 2)),
        roles.EventWithdrawalConfirmed(a, Assets(1, 2), b),
        roles.EventCollateralAdded(a, Assets(1, 2)),
        roles.EventCollateralNeeded(a, Assets(1, 2)),
        roles.EventThreadOpened(signed),
        roles.EventThreadClosed(signed),
        roles.EventHubPaymentReceived(Assets(1, 2)),
        roles.EventRejected(a, RejectReason.BAD_SIGNATURE, "forged"),
    )


def test_every_registered_type_is_covered_by_some_round_trip() -> None:
    seen, states = scenario_results()
    covered = set(seen) | set(MESSAGE_STRATEGIES) | set(UPDATE_STRATEGIES)
    channel = next(s for s in states if isinstance(s, ChannelSide))
    thread = next(s for s in states if isinstance(s, ThreadSide) and s.latest is not None)
    assert thread.latest is not None
    extra = (EventChannelSynced(channel.latest), EventThreadAgreed(thread.latest))
    for sample in (*SAMPLES, *extra, ActionConfirmLock(), *role_samples(thread.latest)):
        assert_round_trips(sample)
        covered |= registered_types_in(sample)
    assert set(CODEC_TYPES.values()) - covered == set()


def test_registry() -> None:
    assert CODEC_TYPES["protocols.channel.ChannelSide"] is ChannelSide
    assert CODEC_TYPES["protocols.thread.ThreadSide"] is ThreadSide
    assert CODEC_TYPES["protocols.types.Party"] is Party
    # Two classes with one name in different modules are told apart.
    assert CODEC_TYPES["protocols.channel.ActionReconnected"] is ActionReconnected
    assert CODEC_TYPES["protocols.thread.ActionReconnected"] is ThreadReconnected
    # Only classes defined in the scanned modules, not those they import.
    assert all(
        name.startswith(type_name(cls).rsplit(".", 1)[0]) for name, cls in CODEC_TYPES.items()
    )
    assert "protocols.messages.Address" not in CODEC_TYPES


def test_domain_separator_is_not_stored_but_recomputed() -> None:
    domain = Domain(1337, Address(b"\x22" * 20))
    data = encode(domain)
    assert domain.separator not in data and b"separator" not in data
    assert decode(data).separator == domain.separator  # type: ignore[attr-defined]


# ---------------------------------------------------------------- hypothesis round trips

PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | addresses()
    | st.sampled_from(RejectReason),
    lambda children: (
        st.lists(children, max_size=4).map(tuple)
        | st.frozensets(children.filter(lambda v: type(v) is not tuple or hash_ok(v)), max_size=4)
    ),
    max_leaves=20,
)


def hash_ok(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(PLAIN)
def test_plain_values_round_trip(value: object) -> None:
    assert_round_trips(value)


@given(st.one_of(st.integers(), st.sampled_from((2**64 - 1, 2**64, -(2**63), -(2**63) - 1))))
def test_ints_of_any_size_round_trip(value: int) -> None:
    assert_round_trips(value)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        channel_states(),
        thread_states(),
        signed_thread_states(),
        thread_keys(),
        assets(),
        signatures(),
        st.builds(SignedChannelState, channel_states(), signatures() | st.none(), st.none()),
        st.builds(
            ChannelRecord,
            assets(),
            assets(),
            assets(),
            uint256s(),
            uint256s(),
            st.binary(min_size=32, max_size=32),
            uint256s(),
            uint256s(),
            st.sampled_from(ChannelPhase),
        ),
        st.builds(ThreadDispute, assets(), assets(), uint256s(), uint256s(), st.booleans()),
        st.builds(Domain, uint256s(), addresses(), st.text(max_size=10), st.text(max_size=10)),
    )
)
def test_value_types_round_trip(value: object) -> None:
    assert_round_trips(value)


@pytest.mark.parametrize("cls", list(MESSAGE_STRATEGIES), ids=lambda c: c.__name__)
def test_every_message_type_round_trips(cls: type) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(MESSAGE_STRATEGIES[cls])
    def check(message: object) -> None:
        assert type(message) is cls
        assert_round_trips(message)

    check()


@given(st.frozensets(thread_keys(), max_size=6), st.randoms(use_true_random=False))
def test_equal_sets_encode_equally_whatever_their_insertion_order(
    keys: frozenset[ThreadKey], rnd: Any
) -> None:
    items = list(keys)
    rnd.shuffle(items)
    assert encode(frozenset(items)) == encode(keys)
    assert decode(encode(keys)) == keys


# ---------------------------------------------------------------- canonical rule


def ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"\x05", 5),
        (b"\xcd\x01\x00", 256),
        (b"\xcf" + b"\xff" * 8, 2**64 - 1),
        (ext(1, b"\x00\x01" + b"\x00" * 8), 2**64),
        (ext(1, b"\x01\x80" + b"\x00" * 6 + b"\x01"), -(2**63) - 1),
        (ext(2, b"\x01\x02"), frozenset({1, 2})),
        (b"\xa1a", "a"),
    ],
)
def test_canonical_forms_decode(data: bytes, value: object) -> None:
    assert decode(data) == value
    assert encode(value) == data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xcd\x00\x05", id="uint16 for a fixint"),
        pytest.param(b"\xd0\x05", id="int8 for a positive fixint"),
        pytest.param(b"\xcf" + b"\x00" * 7 + b"\x05", id="uint64 for a fixint"),
        pytest.param(ext(1, b"\x00\x05"), id="big int that fits 64 bits"),
        pytest.param(ext(1, b"\x00\x00\x01" + b"\x00" * 8), id="big int with a leading zero"),
        pytest.param(ext(1, b"\x02\x01" + b"\x00" * 8), id="big int with a bad sign byte"),
        pytest.param(ext(1, b"\x00"), id="big int without magnitude"),
        pytest.param(ext(2, b"\x02\x01"), id="set out of order"),
        pytest.param(ext(2, b"\x01\x01"), id="set with a duplicate"),
        pytest.param(b"\xd9\x01a", id="str8 for a fixstr"),
        pytest.param(b"\xdc\x00\x01\x01", id="array16 for a fixarray"),
        pytest.param(b"\x05\x05", id="trailing data"),
    ],
)
def test_non_canonical_input_is_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_dataclass_fields_out_of_order_or_mismatched_are_refused() -> None:
    def dataclass_ext(name: str, fields: dict[str, object]) -> bytes:
        return ext(4, msgpack.packb(name) + msgpack.packb(fields))

    name = "protocols.types.Assets"
    assert decode(dataclass_ext(name, {"eth": 1, "token": 2})) == Assets(1, 2)
    bad_fields: list[dict[str, object]] = [
        {"token": 2, "eth": 1},  # reordered
        {"eth": 1},  # missing
        {"eth": 1, "token": 2, "extra": 3},  # one too many
        {"eth": 1, "tokens": 2},  # renamed
        {"eth": True, "token": 2},  # bool for int (the annotation is exact)
        {"eth": -1, "token": 2},  # the constructor's own check (InvalidValue)
        {"eth": 1.5, "token": 2},  # a float
    ]
    for fields in bad_fields:
        with pytest.raises(CodecError):
            decode(dataclass_ext(name, fields))
    with pytest.raises(CodecError, match="unknown type name"):
        decode(dataclass_ext("protocols.types.Nope", {}))
    with pytest.raises(CodecError):  # an enum name used as a dataclass
        decode(dataclass_ext("protocols.types.Party", {}))
    with pytest.raises(CodecError):  # the separator is not a constructor argument
        domain = encode(Domain(1, Address(b"\x01" * 20)))
        decode(domain.replace(b"\xa7version\xa11", b"\xa7version\xa11\xa9separator\xc4\x00"))


def test_enum_refusals() -> None:
    assert decode(ext(3, msgpack.packb("protocols.types.Party") + msgpack.packb("hub"))) is (
        Party.HUB
    )
    for payload in (
        msgpack.packb("protocols.types.Party") + msgpack.packb("nobody"),
        msgpack.packb("protocols.types.Address") + msgpack.packb("hub"),
        msgpack.packb("protocols.types.Party"),
        msgpack.packb("protocols.onchain.ChannelPhase") + msgpack.packb(True),  # True == 1
    ):
        with pytest.raises(CodecError):
            decode(ext(3, payload))


# ---------------------------------------------------------------- encode refusals


class Color(IntEnum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Unregistered:
    x: int


@pytest.mark.parametrize(
    "value",
    [
        [1, 2],
        {"a": 1},
        1.5,
        bytearray(b"x"),
        {1, 2},
        Color.RED,
        Unregistered(1),
        object(),
        "lone surrogate \udc80",
        (1, [2]),
        frozenset({(1, 2.0)}),
        Transition([1]),  # a list inside a registered dataclass
        Transition(None, [Party.HUB]),  # type: ignore[arg-type]
        Rejection(RejectReason.POLICY, b"bytes for str"),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_unsupported_values_are_refused(value: object) -> None:
    with pytest.raises(CodecError):
        encode(value)


def test_a_state_holding_a_list_is_refused() -> None:
    _, states = scenario_results()
    side = next(s for s in states if isinstance(s, ChannelSide))
    with pytest.raises(CodecError, match="threads"):
        encode(dataclasses.replace(side, threads=list(side.threads)))  # type: ignore[arg-type]


# ---------------------------------------------------------------- decode is total


def assert_total(data: bytes) -> None:
    try:
        value = decode(data)
    except CodecError:
        return
    assert encode(value) == data


@functools.cache
def corpus() -> tuple[bytes, ...]:
    _, states = scenario_results()
    samples = [encode(s) for s in states[:: max(1, len(states) // 12)]]
    samples += [encode(s) for s in SAMPLES]
    samples += [encode(frozenset({1, 2**70, b"x", "y"})), encode((None, True, -1, (2,)))]
    return tuple(samples)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512))
def test_decode_of_arbitrary_bytes_is_total(data: bytes) -> None:
    assert_total(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_decode_of_mutated_encodings_is_total(data: bytes) -> None:
    assert_total(data)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: b"\x91" * n + b"\xc0",  # nested arrays
        lambda n: functools.reduce(lambda acc, _: ext(2, acc), range(n), b""),  # nested sets
    ],
    ids=["arrays", "sets"],
)
@pytest.mark.parametrize("depth", [100, 5_000])
def test_deep_nesting_is_a_codec_error_or_a_value(make: Callable[[int], bytes], depth: int) -> None:
    assert_total(make(depth))


def test_decode_takes_only_bytes() -> None:
    with pytest.raises(CodecError):
        decode(bytearray(encode(1)))  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode(b"")


def test_enum_values_and_names_are_the_stored_identity() -> None:
    # The member's value (the wire code for RejectReason), not its name, is stored.
    data = encode(RejectReason.POLICY)
    assert msgpack.packb(90) in data and b"POLICY" not in data
    assert isinstance(RejectReason.POLICY, Enum)
