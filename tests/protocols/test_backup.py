"""Backups, the pure part: content codec and checks, key and AEAD, blocks and CIDs,
announcements, the replica policy and the recovery choice (protocols/backup.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.bitswap.cid import compute_cid_v1

from protocols import backup
from protocols.backup import (
    BLOCK_BYTES,
    CID_PREFIX,
    HELD_BOTH,
    HELD_RECEIVER,
    HELD_SENDER,
    MAX_ANNOUNCEMENT_BYTES,
    MAX_CONTENT_BYTES,
    MAX_SEALED_BYTES,
    Announcement,
    BackupContent,
    BackupDecodeError,
    BackupError,
    BackupMismatch,
    BackupReason,
    BackupRoot,
    BackupThread,
    BackupTooLarge,
    BadBackupSignature,
    BlockMissing,
    CidMismatch,
    DecryptionFailed,
    DuplicateEntry,
    InvalidEntry,
    NotOwnersState,
    OfferOutcome,
    Priority,
    ReplicaTable,
    SizeMismatch,
    StaleBackup,
    announcement_digest,
    backup_aad,
    backup_key,
    check_announcement,
    check_content,
    check_not_stale,
    choose_backup,
    cid_of,
    decode_announcement,
    decode_content,
    decode_root,
    encode_announcement,
    encode_content,
    encode_root,
    forget,
    from_blocks,
    held_bit,
    make_announcement,
    offer,
    open_backup,
    pack_backup,
    rank_backups,
    seal,
    seal_backup,
    stored_bytes,
    to_blocks,
    unseal,
)
from protocols.channel import SignedChannelState, genesis_state
from protocols.eip712 import Domain
from protocols.errors import DecodeError, InvalidSignature, InvalidValue, LocalProtocolError
from protocols.keccak import keccak
from protocols.messages import SignedThreadState
from protocols.signing import Signer
from protocols.thread_root import thread_root
from protocols.types import Address, Assets, Party, ThreadKey, ThreadState
from protocols.wire import SIGNED_THREAD_STATE_FIELD
from tests.protocols.strategies import channel_states, signatures, signed_thread_states
from tests.protocols.world import World

DOMAIN = Domain(chain_id=1337, verifying_contract=Address(b"\xc0" * 20))
OTHER_DOMAIN = Domain(chain_id=1338, verifying_contract=Address(b"\xc0" * 20))
OTHER_MANAGER = Domain(chain_id=1337, verifying_contract=Address(b"\xc1" * 20))

HUB_KEY = (1).to_bytes(32, "big")
HUB = Signer(HUB_KEY)
ALICE_KEY = (2).to_bytes(32, "big")
ALICE = Signer(ALICE_KEY)
BOB = Signer((3).to_bytes(32, "big"))
CAROL = Signer((4).to_bytes(32, "big"))
MALLORY = Signer((5).to_bytes(32, "big"))
KEY = backup_key(ALICE_KEY)
NONCE = bytes(range(12))

# ---------------------------------------------------------------- builders


def signed_channel(user: Signer, tx: int = 7, hub: Signer = HUB) -> SignedChannelState:
    state = dataclasses.replace(
        genesis_state(user.address),
        balance_hub=Assets(100 + tx, 3),
        balance_user=Assets(50, 1),
        tx_count_global=tx,
        tx_count_onchain=2,
    )
    return SignedChannelState(
        state, hub.sign_channel_state(DOMAIN, state), user.sign_channel_state(DOMAIN, state)
    )


def signed_thread(
    sender: Signer,
    receiver: Signer,
    thread_id: int = 1,
    tx_count: int = 0,
    paid: int = 0,
    domain: Domain = DOMAIN,
) -> SignedThreadState:
    state = ThreadState(
        thread_id,
        sender.address,
        receiver.address,
        Assets(10 - paid, 0),
        Assets(5 + paid, 0),
        tx_count,
    )
    return SignedThreadState(
        state,
        sender.sign_thread_state(domain, state),
        receiver.sign_thread_state(domain, state),
    )


def thread_entry(
    sender: Signer,
    receiver: Signer,
    thread_id: int = 1,
    tx_count: int = 3,
    held: int = HELD_SENDER,
) -> BackupThread:
    return BackupThread(
        signed_thread(sender, receiver, thread_id),
        signed_thread(sender, receiver, thread_id, tx_count, paid=tx_count),
        held,
    )


def alice_content(sequence: int = 4) -> BackupContent:
    """Alice's backup: her channel, a thread she sends in and one she receives in."""
    return BackupContent(
        owner=ALICE.address,
        domain=DOMAIN,
        hub=HUB.address,
        sequence=sequence,
        channels=(signed_channel(ALICE),),
        threads=(
            thread_entry(ALICE, BOB, 1),
            thread_entry(CAROL, ALICE, 2, tx_count=0, held=HELD_RECEIVER),
        ),
    )


def hub_content() -> BackupContent:
    """The hub's backup: two channels and the initial state of the thread between them."""
    initial = signed_thread(ALICE, BOB, 1)
    return BackupContent(
        owner=HUB.address,
        domain=DOMAIN,
        hub=HUB.address,
        sequence=1,
        channels=(signed_channel(ALICE), signed_channel(BOB)),
        threads=(BackupThread(initial, initial, HELD_BOTH),),
    )


def blocks_of(content: BackupContent) -> tuple[Announcement, dict[bytes, bytes]]:
    return pack_backup(KEY, NONCE, content, ALICE)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes((data[index] ^ 0x01,)) + data[index + 1 :]


@st.composite
def contents(draw: st.DrawFn) -> BackupContent:
    """Well-formed content with arbitrary (not necessarily valid) signatures."""
    channels = draw(
        st.lists(
            st.builds(SignedChannelState, channel_states(), signatures(), signatures()), max_size=3
        )
    )
    threads = draw(
        st.lists(
            st.builds(
                BackupThread,
                signed_thread_states(),
                signed_thread_states(),
                st.integers(0, 2**64 - 1),
            ),
            max_size=3,
        )
    )
    return BackupContent(
        owner=Address(draw(st.binary(min_size=20, max_size=20))),
        domain=Domain(
            draw(st.integers(0, 2**256 - 1)), Address(draw(st.binary(min_size=20, max_size=20)))
        ),
        hub=Address(draw(st.binary(min_size=20, max_size=20))),
        sequence=draw(st.integers(0, 2**64 - 1)),
        channels=tuple(channels),
        threads=tuple(threads),
    )


# ---------------------------------------------------------------- the whole path


def test_round_trip_content_seal_blocks_unseal_check() -> None:
    content = alice_content()
    announcement, blocks = blocks_of(content)
    check_announcement(announcement, DOMAIN, max_size=1 << 20)
    assert announcement.owner == ALICE.address and announcement.sequence == content.sequence
    sealed = from_blocks(announcement.root_cid, blocks.get, announcement.size)
    assert len(sealed) == announcement.size
    recovered = open_backup(backup_key(ALICE_KEY), sealed, announcement, DOMAIN)
    assert recovered == content
    assert encode_content(recovered) == encode_content(content)


def test_states_from_real_machines_pass_the_check() -> None:
    # A run of the channel and thread machines: what a user node and the hub would back up.
    world = World(2)
    a, b = (u.address for u in world.users)
    for user in (a, b):
        world.fund(user, Party.USER, Assets(100, 0))
        world.fund(user, Party.HUB, Assets(100, 0))
    record = world.open_thread(0, 1, Assets(10, 0), Assets(5, 0), Assets(50, 0), 8)
    world.drain()
    world.pay(record, a, Assets(3, 0))
    world.drain()
    assert record.status == "open" and not world.problems
    side = world.channels[a].user_end.state
    thread_side = record.side(a)
    assert thread_side is not None and thread_side.latest is not None
    assert thread_side.latest.state.tx_count > 0
    user_content = BackupContent(
        a,
        DOMAIN,
        world.hub.address,
        1,
        (side.latest,),
        tuple(BackupThread(t, thread_side.latest, held_bit(t.state.key, a)) for t in side.threads),
    )
    # The channel's thread root commits to exactly the backed-up initial states.
    assert side.latest.state.thread_root == thread_root(
        t.initial.state for t in user_content.threads
    )
    check_content(decode_content(encode_content(user_content)), a, DOMAIN)
    hub_sides = [world.channels[u].hub_end.state for u in (a, b)]
    initials = {t.state.key: t for s in hub_sides for t in s.threads}
    held: dict[ThreadKey, int] = {}
    for s in hub_sides:
        for t in s.threads:
            held[t.state.key] = held.get(t.state.key, 0) | held_bit(t.state.key, s.user)
    assert set(held.values()) == {HELD_BOTH}  # open in both channels
    hub_backup = BackupContent(
        world.hub.address,
        DOMAIN,
        world.hub.address,
        9,
        tuple(s.latest for s in hub_sides),
        tuple(BackupThread(t, t, held[k]) for k, t in initials.items()),
    )
    check_content(decode_content(encode_content(hub_backup)), world.hub.address, DOMAIN)
    with pytest.raises(BadBackupSignature):  # the world signs for its own domain only
        check_content(dataclasses.replace(user_content, domain=OTHER_DOMAIN), a, OTHER_DOMAIN)


# ---------------------------------------------------------------- content codec


@settings(max_examples=60)
@given(contents())
def test_content_codec_round_trips_with_one_encoding(content: BackupContent) -> None:
    data = encode_content(content)
    assert data[:3] == bytes((0x93, backup.BACKUP_VERSION, backup.CONTENT_CODE))
    decoded = decode_content(data)
    assert decoded == content
    assert encode_content(decoded) == data


@settings(max_examples=150)
@given(st.data())
def test_content_decoding_is_total(data: st.DataObject) -> None:
    valid = encode_content(alice_content())
    mutation = data.draw(st.sampled_from(("flip", "truncate", "insert")))
    index = data.draw(st.integers(0, len(valid) - 1))
    if mutation == "flip":
        mutated = valid[:index] + bytes((data.draw(st.integers(0, 255)),)) + valid[index + 1 :]
    elif mutation == "truncate":
        mutated = valid[:index]
    else:
        mutated = valid[:index] + data.draw(st.binary(min_size=1, max_size=4)) + valid[index:]
    try:
        decoded = decode_content(mutated)
    except BackupError as exc:
        assert isinstance(exc, BackupDecodeError | BackupTooLarge)
    else:
        assert encode_content(decoded) == mutated


def _content_with_body(body: list[object]) -> bytes:
    data: bytes = msgpack.packb([1, backup.CONTENT_CODE, body])
    return data


def _valid_body() -> list[object]:
    body: list[object] = msgpack.unpackb(encode_content(alice_content()))[2]
    return body


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: b"", "must start"),
        (lambda: encode_content(alice_content()) + b"\x00", "trailing"),
        (lambda: msgpack.packb([2, 1, _valid_body()]), "must start"),
        (lambda: msgpack.packb([1, 3, _valid_body()]), "must start"),
        (lambda: _content_with_body(_valid_body()[:5]), "has 6 fields"),
        (lambda: _content_with_body([*_valid_body()[:3], -1, *_valid_body()[4:]]), "sequence"),
        (
            lambda: _content_with_body([*_valid_body()[:3], "x", *_valid_body()[4:]]),
            "invalid msgpack",
        ),
        (lambda: _content_with_body([b"\x01" * 19, *_valid_body()[1:]]), "owner"),
        (lambda: _content_with_body([*_valid_body()[:4], [None], *_valid_body()[5:]]), "channels"),
        (lambda: _content_with_body([*_valid_body()[:4], {}, *_valid_body()[5:]]), "channels"),
        # a non-canonical form: sequence 4 as uint16
        (
            lambda: encode_content(alice_content()).replace(b"\x04\x91", b"\xcd\x00\x04\x91", 1),
            "non-canonical",
        ),
    ],
)
def test_malformed_content_is_refused(make: object, needle: str) -> None:
    assert callable(make)
    with pytest.raises(BackupDecodeError, match=needle) as info:
        decode_content(make())
    assert info.value.reason is BackupReason.MALFORMED
    assert isinstance(info.value, DecodeError)


def test_non_canonical_sequence_is_in_the_expected_place() -> None:
    # Guards the byte surgery above: sequence 4 is followed by the channels array of 1.
    assert b"\x04\x91" in encode_content(alice_content())


def _signed_thread_bytes(signed: SignedThreadState) -> bytes:
    data: bytes = msgpack.packb(SIGNED_THREAD_STATE_FIELD.encode(signed))
    return data


@pytest.mark.parametrize("held", [HELD_SENDER, HELD_RECEIVER, HELD_BOTH])
def test_held_is_a_thread_entrys_third_field_in_one_byte(held: int) -> None:
    assert (HELD_SENDER, HELD_RECEIVER, HELD_BOTH) == (1, 2, 3)
    initial = signed_thread(ALICE, BOB, 1)
    latest = signed_thread(ALICE, BOB, 1, 3, paid=3)
    content = dataclasses.replace(hub_content(), threads=(BackupThread(initial, latest, held),))
    data = encode_content(content)
    # The threads array (of one entry) ends the record: [initial, latest, held].
    entry = b"\x93" + _signed_thread_bytes(initial) + _signed_thread_bytes(latest) + bytes((held,))
    assert data.endswith(b"\x91" + entry)
    decoded = decode_content(data)
    assert decoded == content and decoded.threads[0].held == held
    assert encode_content(decoded) == data
    check_content(decoded, HUB.address, DOMAIN)


def _content_with_thread_entry(change: object) -> bytes:
    assert callable(change)
    body = _valid_body()
    threads = body[5]
    assert isinstance(threads, list)
    return _content_with_body([*body[:5], [change(threads[0]), *threads[1:]]])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda e: e[:2], "threads\\[0\\]: BackupThread has 3 fields, got 2"),  # no `held`
        (lambda e: [*e, 1], "threads\\[0\\]: BackupThread has 3 fields, got 4"),
        (lambda e: [*e[:2], -1], "threads\\[0\\].held"),
        (lambda e: [*e[:2], b"\x01"], "threads\\[0\\].held"),
        (lambda e: [*e[:2], [1]], "threads\\[0\\].held"),
    ],
)
def test_malformed_held_is_refused(change: object, needle: str) -> None:
    with pytest.raises(BackupDecodeError, match=needle):
        decode_content(_content_with_thread_entry(change))


def test_held_has_one_encoding() -> None:
    data = encode_content(hub_content())
    assert data.endswith(b"\x03")  # the last thread's held, a positive fixint
    assert decode_content(data).threads[-1].held == HELD_BOTH
    for longer in (b"\xcc\x03", b"\xcd\x00\x03", b"\xcf" + (3).to_bytes(8, "big")):
        with pytest.raises(BackupDecodeError, match="non-canonical"):
            decode_content(data[:-1] + longer)
    with pytest.raises(InvalidValue, match="held"):
        BackupThread(signed_thread(ALICE, BOB), signed_thread(ALICE, BOB), 2**64)
    with pytest.raises(InvalidValue, match="held"):
        BackupThread(signed_thread(ALICE, BOB), signed_thread(ALICE, BOB), True)


def test_oversized_content_is_refused_unparsed() -> None:
    with pytest.raises(BackupTooLarge):
        decode_content(b"\x93\x01\x01" + bytes(MAX_CONTENT_BYTES))


def test_encoder_refuses_what_the_decoder_would() -> None:
    unsigned = dataclasses.replace(
        alice_content(), channels=(SignedChannelState(genesis_state(ALICE.address), None, None),)
    )
    with pytest.raises(LocalProtocolError):
        encode_content(unsigned)
    renamed = dataclasses.replace(
        alice_content(), domain=Domain(1337, DOMAIN.verifying_contract, name="X")
    )
    with pytest.raises(LocalProtocolError):
        encode_content(renamed)
    with pytest.raises(InvalidValue):
        dataclasses.replace(alice_content(), sequence=2**64)
    with pytest.raises(InvalidValue):
        dataclasses.replace(alice_content(), channels=[signed_channel(ALICE)])  # type: ignore[arg-type]


# ---------------------------------------------------------------- content checks


def test_valid_contents_pass() -> None:
    check_content(alice_content(), ALICE.address, DOMAIN)
    check_content(hub_content(), HUB.address, DOMAIN)


def _with_thread(content: BackupContent, index: int, entry: BackupThread) -> BackupContent:
    threads = list(content.threads)
    threads[index] = entry
    return dataclasses.replace(content, threads=tuple(threads))


def _swap_sig(signed: SignedThreadState, which: str, by: Signer) -> SignedThreadState:
    signature = by.sign_thread_state(DOMAIN, signed.state)
    if which == "sig_sender":
        return dataclasses.replace(signed, sig_sender=signature)
    return dataclasses.replace(signed, sig_receiver=signature)


def _bad_signature_cases() -> list[tuple[str, BackupContent]]:
    content = alice_content()
    channel = content.channels[0]
    entry = content.threads[0]
    state = channel.state
    return [
        (
            "hub sig by the user",
            dataclasses.replace(
                content,
                channels=(dataclasses.replace(channel, sig_hub=channel.sig_user),),
            ),
        ),
        (
            "user sig by mallory",
            dataclasses.replace(
                content,
                channels=(
                    dataclasses.replace(
                        channel, sig_user=MALLORY.sign_channel_state(DOMAIN, state)
                    ),
                ),
            ),
        ),
        (
            "user sig over another domain",
            dataclasses.replace(
                content,
                channels=(
                    dataclasses.replace(
                        channel, sig_user=ALICE.sign_channel_state(OTHER_DOMAIN, state)
                    ),
                ),
            ),
        ),
        (
            "initial sender sig",
            _with_thread(
                content,
                0,
                dataclasses.replace(entry, initial=_swap_sig(entry.initial, "sig_sender", MALLORY)),
            ),
        ),
        (
            "initial receiver sig",
            _with_thread(
                content,
                0,
                dataclasses.replace(entry, initial=_swap_sig(entry.initial, "sig_receiver", ALICE)),
            ),
        ),
        (
            "latest sender sig",
            _with_thread(
                content,
                0,
                dataclasses.replace(entry, latest=_swap_sig(entry.latest, "sig_sender", BOB)),
            ),
        ),
        (
            "latest receiver sig",
            _with_thread(
                content,
                0,
                dataclasses.replace(entry, latest=_swap_sig(entry.latest, "sig_receiver", MALLORY)),
            ),
        ),
        (
            "latest signed over another state",
            _with_thread(
                content,
                0,
                dataclasses.replace(
                    entry,
                    latest=dataclasses.replace(
                        entry.latest, sig_receiver=entry.initial.sig_receiver
                    ),
                ),
            ),
        ),
    ]


@pytest.mark.parametrize(
    "content", [pytest.param(content, id=label) for label, content in _bad_signature_cases()]
)
def test_a_wrong_signature_anywhere_is_refused(content: BackupContent) -> None:
    with pytest.raises(BadBackupSignature) as info:
        check_content(content, ALICE.address, DOMAIN)
    assert info.value.reason is BackupReason.BAD_SIGNATURE
    assert isinstance(info.value, InvalidSignature)


def test_content_of_another_owner_or_domain_is_refused() -> None:
    with pytest.raises(BackupMismatch):
        check_content(alice_content(), BOB.address, DOMAIN)
    with pytest.raises(BackupMismatch):
        check_content(alice_content(), ALICE.address, OTHER_MANAGER)


def test_states_that_are_not_the_owners_are_refused() -> None:
    content = alice_content()
    with pytest.raises(NotOwnersState, match="channel of"):
        check_content(
            dataclasses.replace(content, channels=(signed_channel(BOB),)), ALICE.address, DOMAIN
        )
    with pytest.raises(NotOwnersState, match="not a party"):
        check_content(_with_thread(content, 1, thread_entry(BOB, CAROL, 2)), ALICE.address, DOMAIN)
    # The hub keeps threads of its users only.
    hub = hub_content()
    with pytest.raises(NotOwnersState, match="neither party"):
        check_content(_with_thread(hub, 0, thread_entry(CAROL, MALLORY, 5)), HUB.address, DOMAIN)


def test_duplicates_are_refused() -> None:
    content = alice_content()
    with pytest.raises(DuplicateEntry, match="channel"):
        check_content(
            dataclasses.replace(
                content, channels=(signed_channel(ALICE, 7), signed_channel(ALICE, 8))
            ),
            ALICE.address,
            DOMAIN,
        )
    with pytest.raises(DuplicateEntry, match="thread"):
        check_content(
            dataclasses.replace(
                content, threads=(thread_entry(ALICE, BOB, 1, 2), thread_entry(ALICE, BOB, 1, 3))
            ),
            ALICE.address,
            DOMAIN,
        )
    hub = hub_content()
    with pytest.raises(DuplicateEntry):
        check_content(
            dataclasses.replace(hub, channels=hub.channels + hub.channels[:1]), HUB.address, DOMAIN
        )


def test_inconsistent_entries_are_refused() -> None:
    content = alice_content()
    cases = [
        BackupThread(
            signed_thread(ALICE, BOB, 1, tx_count=1), signed_thread(ALICE, BOB, 1, 3), HELD_SENDER
        ),
        BackupThread(signed_thread(ALICE, BOB, 1), signed_thread(ALICE, BOB, 9, 3), HELD_SENDER),
        BackupThread(signed_thread(ALICE, BOB, 1), signed_thread(BOB, ALICE, 1, 3), HELD_SENDER),
    ]
    for entry in cases:
        with pytest.raises(InvalidEntry):
            check_content(_with_thread(content, 0, entry), ALICE.address, DOMAIN)
    state = signed_thread(ALICE, BOB, 1, 4).state
    richer = dataclasses.replace(state, balance_receiver=Assets(999, 0))
    unbalanced = SignedThreadState(
        richer, ALICE.sign_thread_state(DOMAIN, richer), BOB.sign_thread_state(DOMAIN, richer)
    )
    with pytest.raises(InvalidEntry, match="total"):
        check_content(
            _with_thread(
                content, 0, BackupThread(signed_thread(ALICE, BOB, 1), unbalanced, HELD_SENDER)
            ),
            ALICE.address,
            DOMAIN,
        )
    hub = hub_content()
    with pytest.raises(InvalidEntry, match="itself"):
        check_content(
            dataclasses.replace(hub, channels=(signed_channel(HUB, hub=HUB),)), HUB.address, DOMAIN
        )


def _with_held(content: BackupContent, index: int, held: int) -> BackupContent:
    return _with_thread(content, index, dataclasses.replace(content.threads[index], held=held))


def _alice_without_channel() -> BackupContent:
    return dataclasses.replace(alice_content(), channels=())


def _hub_with_alices_channel_only() -> BackupContent:
    hub = hub_content()
    return dataclasses.replace(hub, channels=hub.channels[:1])


@pytest.mark.parametrize(
    ("make", "owner", "needle"),
    [
        # out of range, for a user and for the hub
        (lambda: _with_held(alice_content(), 0, 0), ALICE, "held 0 not in"),
        (lambda: _with_held(alice_content(), 0, 4), ALICE, "held 4 not in"),
        (lambda: _with_held(hub_content(), 0, 0), HUB, "held 0 not in"),
        (lambda: _with_held(hub_content(), 0, 4), HUB, "held 4 not in"),
        (lambda: _with_held(hub_content(), 0, 2**64 - 1), HUB, "not in"),
        # a user's backup names a channel that is not its own
        (lambda: _with_held(alice_content(), 0, HELD_RECEIVER), ALICE, "owner's"),  # she sends
        (lambda: _with_held(alice_content(), 1, HELD_SENDER), ALICE, "owner's"),  # she receives
        (lambda: _with_held(alice_content(), 0, HELD_BOTH), ALICE, "owner's"),
        (lambda: _with_held(alice_content(), 1, HELD_BOTH), ALICE, "owner's"),
        # ... or its own channel, which the backup lacks
        (_alice_without_channel, ALICE, "without a channel"),
        # the hub's names a party without a channel in the backup (Bob's)
        (lambda: _with_held(_hub_with_alices_channel_only(), 0, HELD_RECEIVER), HUB, "without"),
        (lambda: _with_held(_hub_with_alices_channel_only(), 0, HELD_BOTH), HUB, "without"),
    ],
)
def test_a_held_that_does_not_name_the_backups_channels_is_refused(
    make: object, owner: Signer, needle: str
) -> None:
    assert callable(make)
    with pytest.raises(InvalidEntry, match=needle) as info:
        check_content(make(), owner.address, DOMAIN)
    assert info.value.reason is BackupReason.INVALID_ENTRY


def test_a_held_that_names_the_backups_channels_passes() -> None:
    # The counterparts of the refusals above.
    check_content(_with_held(hub_content(), 0, HELD_SENDER), HUB.address, DOMAIN)
    check_content(_with_held(hub_content(), 0, HELD_RECEIVER), HUB.address, DOMAIN)
    check_content(_with_held(_hub_with_alices_channel_only(), 0, HELD_SENDER), HUB.address, DOMAIN)
    check_content(dataclasses.replace(_alice_without_channel(), threads=()), ALICE.address, DOMAIN)
    content = alice_content()
    assert [t.held for t in content.threads] == [HELD_SENDER, HELD_RECEIVER]
    assert [t.held_in(ALICE.address) for t in content.threads] == [True, True]
    assert [t.held_in(BOB.address) for t in content.threads] == [False, False]
    assert held_bit(content.threads[0].key, MALLORY.address) == 0


# ---------------------------------------------------------------- key and AEAD


def _rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_backup_key_is_hkdf_sha256_with_the_spec_constants() -> None:
    expected = _rfc5869_hkdf_sha256(ALICE_KEY, b"weft backup salt v1", b"weft backup v1")
    assert backup_key(ALICE_KEY) == expected
    assert backup_key(ALICE_KEY) != backup_key(HUB_KEY)
    assert len(backup_key(ALICE_KEY)) == 32
    with pytest.raises(InvalidValue):
        backup_key(ALICE_KEY[:31])


def test_wrong_key_or_tampering_fails_to_decrypt() -> None:
    aad = backup_aad(DOMAIN, ALICE.address, 4)
    sealed = seal(KEY, NONCE, b"states", aad)
    assert sealed[:12] == NONCE and len(sealed) == 6 + 28
    assert unseal(KEY, sealed, aad) == b"states"
    with pytest.raises(DecryptionFailed) as info:
        unseal(backup_key(HUB_KEY), sealed, aad)
    assert info.value.reason is BackupReason.DECRYPTION_FAILED
    for index in (0, 12, len(sealed) - 1):
        with pytest.raises(DecryptionFailed):
            unseal(KEY, flip(sealed, index), aad)
    with pytest.raises(DecryptionFailed):
        unseal(KEY, sealed[:27], aad)
    with pytest.raises(InvalidValue):
        seal(KEY, NONCE[:11], b"states", aad)
    with pytest.raises(InvalidValue):
        seal(KEY[:16], NONCE, b"states", aad)


def test_aad_binds_owner_domain_and_sequence() -> None:
    sealed = seal(KEY, NONCE, b"states", backup_aad(DOMAIN, ALICE.address, 4))
    for other in (
        backup_aad(DOMAIN, ALICE.address, 5),
        backup_aad(DOMAIN, BOB.address, 4),
        backup_aad(OTHER_DOMAIN, ALICE.address, 4),
        backup_aad(OTHER_MANAGER, ALICE.address, 4),
    ):
        with pytest.raises(DecryptionFailed):
            unseal(KEY, sealed, other)


def test_blocks_replayed_under_another_sequence_are_refused() -> None:
    content = alice_content(sequence=4)
    announcement, blocks = blocks_of(content)
    sealed = from_blocks(announcement.root_cid, blocks.get)
    # The owner's own, validly signed announcement of the same blocks as sequence 9.
    replayed = make_announcement(ALICE, DOMAIN, 9, announcement.root_cid, announcement.size)
    check_announcement(replayed, DOMAIN, 1 << 20)
    with pytest.raises(DecryptionFailed):
        open_backup(KEY, sealed, replayed, DOMAIN)
    assert open_backup(KEY, sealed, announcement, DOMAIN) == content


def test_content_must_carry_the_announced_sequence() -> None:
    # Sealed under the AAD of sequence 9 but saying 4 inside: only the owner can do that.
    content = alice_content(sequence=4)
    sealed = seal(KEY, NONCE, encode_content(content), backup_aad(DOMAIN, ALICE.address, 9))
    announcement = make_announcement(ALICE, DOMAIN, 9, cid_of(b"root"), len(sealed))
    with pytest.raises(BackupMismatch, match="sequence"):
        open_backup(KEY, sealed, announcement, DOMAIN)


def test_open_backup_checks_the_content() -> None:
    content = dataclasses.replace(alice_content(), channels=(signed_channel(BOB),))
    announcement, blocks = blocks_of(content)
    sealed = from_blocks(announcement.root_cid, blocks.get)
    with pytest.raises(NotOwnersState):
        open_backup(KEY, sealed, announcement, DOMAIN)


# ---------------------------------------------------------------- blocks and CIDs


@settings(max_examples=50)
@given(st.binary(max_size=2048))
def test_cid_is_libp2ps_cidv1_raw_sha256(data: bytes) -> None:
    cid = cid_of(data)
    assert cid == compute_cid_v1(data)
    assert cid == CID_PREFIX + hashlib.sha256(data).digest()
    assert cid[:4] == bytes((0x01, 0x55, 0x12, 0x20))


SIZES = (1, 28, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 1, 3 * BLOCK_BYTES, 3 * BLOCK_BYTES + 7)


@pytest.mark.parametrize("size", SIZES)
def test_blocks_split_and_reassemble(size: int) -> None:
    sealed = hashlib.shake_256(b"sealed").digest(size)
    root_cid, blocks = to_blocks(sealed)
    assert root_cid == compute_cid_v1(blocks[root_cid])
    root = decode_root(blocks[root_cid])
    assert root.total_size == size
    assert len(root.children) == -(-size // BLOCK_BYTES)
    assert all(len(blocks[c]) <= BLOCK_BYTES for c in root.children)
    assert all(c == compute_cid_v1(blocks[c]) for c in root.children)
    assert set(blocks) == {root_cid, *root.children}
    assert sum(map(len, blocks.values())) == stored_bytes(size)
    assert from_blocks(root_cid, blocks.get, size) == sealed
    assert encode_root(root) == blocks[root_cid]


def _multi_block() -> tuple[bytes, dict[bytes, bytes], BackupRoot]:
    sealed = hashlib.shake_256(b"multi").digest(2 * BLOCK_BYTES + 100)
    root_cid, blocks = to_blocks(sealed)
    return root_cid, blocks, decode_root(blocks[root_cid])


@pytest.mark.parametrize("which", ["root", "first", "last"])
def test_a_tampered_block_is_a_cid_mismatch(which: str) -> None:
    root_cid, blocks, root = _multi_block()
    cid = {"root": root_cid, "first": root.children[0], "last": root.children[-1]}[which]
    tampered = dict(blocks)
    tampered[cid] = flip(blocks[cid], len(blocks[cid]) // 2)
    with pytest.raises(CidMismatch) as info:
        from_blocks(root_cid, tampered.get)
    assert info.value.reason is BackupReason.CID_MISMATCH


def test_missing_blocks_and_wrong_sizes_are_refused() -> None:
    root_cid, blocks, root = _multi_block()
    for cid in (root_cid, root.children[1]):
        with pytest.raises(BlockMissing):
            from_blocks(root_cid, {c: b for c, b in blocks.items() if c != cid}.get)
    with pytest.raises(SizeMismatch):
        from_blocks(root_cid, blocks.get, root.total_size - 1)
    # A root whose child count fits the total but whose children are cut elsewhere.
    short, rest = b"a" * (BLOCK_BYTES - 1), b"b" * 11
    odd_root = encode_root(BackupRoot(BLOCK_BYTES + 10, (cid_of(short), cid_of(rest))))
    odd = {cid_of(odd_root): odd_root, cid_of(short): short, cid_of(rest): rest}
    with pytest.raises(SizeMismatch):
        from_blocks(cid_of(odd_root), odd.get)


def test_malformed_roots_are_refused() -> None:
    cid = cid_of(b"x")
    with pytest.raises(InvalidValue):
        BackupRoot(BLOCK_BYTES + 1, (cid,))  # needs two children
    with pytest.raises(InvalidValue):
        BackupRoot(0, ())
    with pytest.raises(InvalidValue):
        BackupRoot(10, (b"\x01\x70" + cid[2:],))  # dag-pb, not raw
    for body in (
        [10, [cid, cid]],
        [10, [cid[:-1]]],
        [0, []],
        [10, cid],
        [MAX_SEALED_BYTES + 1, [cid] * 65],
    ):
        data = msgpack.packb([1, backup.ROOT_CODE, body])
        with pytest.raises((BackupDecodeError, BackupTooLarge)):
            from_blocks(cid_of(data), {cid_of(data): data}.get)
    with pytest.raises(LocalProtocolError):
        to_blocks(b"")
    with pytest.raises(BackupTooLarge):
        decode_root(bytes(backup.MAX_ROOT_BYTES + 1))


# ---------------------------------------------------------------- announcements


def _announcement(signer: Signer = ALICE, sequence: int = 4, size: int = 1000) -> Announcement:
    return make_announcement(signer, DOMAIN, sequence, cid_of(b"root"), size)


def test_announcement_signs_the_domain_separated_fields() -> None:
    a = _announcement()
    check_announcement(a, DOMAIN, max_size=1000)
    assert decode_announcement(encode_announcement(a)) == a
    assert len(encode_announcement(a)) <= MAX_ANNOUNCEMENT_BYTES
    layout = (
        b"\x19weft backup announcement v1"
        + (1337).to_bytes(32, "big")
        + b"\xc0" * 20
        + ALICE.address.raw
        + (4).to_bytes(8, "big")
        + cid_of(b"root")
        + (1000).to_bytes(8, "big")
    )
    assert announcement_digest(DOMAIN, ALICE.address, 4, cid_of(b"root"), 1000) == keccak(layout)
    digests = {
        announcement_digest(d, o, s, c, z)
        for d, o, s, c, z in [
            (DOMAIN, ALICE.address, 4, cid_of(b"root"), 1000),
            (OTHER_DOMAIN, ALICE.address, 4, cid_of(b"root"), 1000),
            (OTHER_MANAGER, ALICE.address, 4, cid_of(b"root"), 1000),
            (DOMAIN, BOB.address, 4, cid_of(b"root"), 1000),
            (DOMAIN, ALICE.address, 5, cid_of(b"root"), 1000),
            (DOMAIN, ALICE.address, 4, cid_of(b"toor"), 1000),
            (DOMAIN, ALICE.address, 4, cid_of(b"root"), 1001),
        ]
    }
    assert len(digests) == 7


def _forgeries() -> list[tuple[str, Announcement]]:
    good = _announcement()
    by_mallory = _announcement(MALLORY)
    return [
        ("signed by another key", dataclasses.replace(by_mallory, owner=ALICE.address)),
        ("sequence raised after signing", dataclasses.replace(good, sequence=5)),
        ("size changed after signing", dataclasses.replace(good, size=999)),
        ("root changed after signing", dataclasses.replace(good, root_cid=cid_of(b"evil"))),
        (
            "signed for another domain",
            make_announcement(ALICE, OTHER_DOMAIN, 4, cid_of(b"root"), 1000),
        ),
    ]


@pytest.mark.parametrize(
    "forged", [pytest.param(forged, id=label) for label, forged in _forgeries()]
)
def test_forged_announcements_are_refused(forged: Announcement) -> None:
    decoded = decode_announcement(encode_announcement(forged))
    with pytest.raises(BadBackupSignature) as info:
        check_announcement(decoded, DOMAIN, max_size=1 << 20)
    assert info.value.reason is BackupReason.BAD_SIGNATURE


def test_oversized_announcements_are_refused() -> None:
    with pytest.raises(BackupTooLarge):
        check_announcement(_announcement(size=1001), DOMAIN, max_size=1000)
    huge = _announcement(size=MAX_SEALED_BYTES + 1)
    with pytest.raises(BackupTooLarge):
        check_announcement(huge, DOMAIN, max_size=2**64 - 1)
    with pytest.raises(BackupTooLarge):
        decode_announcement(encode_announcement(_announcement()) + bytes(MAX_ANNOUNCEMENT_BYTES))


def _announcement_body() -> list[object]:
    body: list[object] = msgpack.unpackb(encode_announcement(_announcement()))[2]
    return body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_announcement_body()[:4], id="missing field"),
        pytest.param(
            [*_announcement_body()[:2], b"\x01\x70" + bytes(34), *_announcement_body()[3:]],
            id="dag-pb cid",
        ),
        pytest.param(
            [*_announcement_body()[:2], bytes(35), *_announcement_body()[3:]], id="short cid"
        ),
        pytest.param([*_announcement_body()[:3], 0, *_announcement_body()[4:]], id="zero size"),
        pytest.param(
            [*_announcement_body()[:1], -1, *_announcement_body()[2:]], id="negative sequence"
        ),
        pytest.param([*_announcement_body()[:4], bytes(65)], id="malformed signature"),
        pytest.param(
            [_announcement_body()[0], [1], *_announcement_body()[2:]], id="array sequence"
        ),
    ],
)
def test_malformed_announcements_are_refused(body: list[object]) -> None:
    with pytest.raises(BackupDecodeError):
        decode_announcement(msgpack.packb([1, backup.ANNOUNCEMENT_CODE, body]))


def test_announcement_envelope_must_be_exact() -> None:
    data = encode_announcement(_announcement())
    for bad in (data[:-1], data + b"\x00", b"\x93\x01\x01" + data[3:], b"\x93\x02" + data[2:]):
        with pytest.raises(BackupDecodeError):
            decode_announcement(bad)


# ---------------------------------------------------------------- replica policy


def _ann(owner: Signer, sequence: int = 1, size: int = 100) -> Announcement:
    return make_announcement(
        owner, DOMAIN, sequence, cid_of(owner.address.raw + bytes([sequence])), size
    )


OWNERS = [Signer((10 + i).to_bytes(32, "big")) for i in range(8)]


def test_own_backup_is_never_kept() -> None:
    table = ReplicaTable(ALICE.address, max_owners=4, max_bytes=1 << 20)
    update = offer(table, _ann(ALICE), Priority.THREAD_PEER)
    assert update.outcome is OfferOutcome.OWN and update.table is table and update.fetch is None


def test_lower_or_equal_sequence_is_ignored_and_higher_replaces() -> None:
    table = ReplicaTable(ALICE.address, max_owners=4, max_bytes=1 << 20)
    first = offer(table, _ann(BOB, 5), Priority.OTHER)
    assert (
        first.outcome is OfferOutcome.ADMITTED and first.fetch == _ann(BOB, 5) and first.evict == ()
    )
    table = first.table
    for sequence in (4, 5):
        ignored = offer(table, _ann(BOB, sequence), Priority.THREAD_PEER)
        assert ignored.outcome is OfferOutcome.STALE
        assert ignored.table is table and ignored.fetch is None and ignored.evict == ()
    newer = offer(table, _ann(BOB, 6, size=300), Priority.OTHER)
    assert newer.outcome is OfferOutcome.REPLACED
    assert newer.evict == (_ann(BOB, 5),) and newer.fetch == _ann(BOB, 6, size=300)
    kept = newer.table.get(BOB.address)
    assert kept is not None and kept.announcement == _ann(BOB, 6, size=300)
    assert newer.table.total_bytes == stored_bytes(300)


def test_owner_count_bound_evicts_the_least_recent_other() -> None:
    table = ReplicaTable(ALICE.address, max_owners=3, max_bytes=1 << 20)
    for owner in OWNERS[:3]:
        table = offer(table, _ann(owner), Priority.OTHER).table
    # OWNERS[0] refreshes: now OWNERS[1] is the least recent.
    table = offer(table, _ann(OWNERS[0], 2), Priority.OTHER).table
    update = offer(table, _ann(OWNERS[3]), Priority.OTHER)
    assert update.outcome is OfferOutcome.ADMITTED
    assert update.evict == (_ann(OWNERS[1]),)
    assert {r.owner for r in update.table.replicas} == {
        o.address for o in (OWNERS[0], OWNERS[2], OWNERS[3])
    }
    assert len(update.table.replicas) == 3


def test_thread_peers_are_kept_first() -> None:
    table = ReplicaTable(ALICE.address, max_owners=2, max_bytes=1 << 20)
    table = offer(table, _ann(OWNERS[0]), Priority.THREAD_PEER).table
    table = offer(table, _ann(OWNERS[1]), Priority.OTHER).table
    # A peer outranks the other, however recent.
    peer = offer(table, _ann(OWNERS[2]), Priority.THREAD_PEER)
    assert peer.outcome is OfferOutcome.ADMITTED and peer.evict == (_ann(OWNERS[1]),)
    # Now both kept owners are thread peers: an other cannot get in.
    refused = offer(peer.table, _ann(OWNERS[3]), Priority.OTHER)
    assert refused.outcome is OfferOutcome.NO_ROOM
    assert refused.table is peer.table and refused.fetch is None and refused.evict == ()


def test_byte_bound_evicts_as_many_as_needed_or_refuses() -> None:
    unit = stored_bytes(100)
    table = ReplicaTable(ALICE.address, max_owners=10, max_bytes=3 * unit)
    for owner in OWNERS[:3]:
        table = offer(table, _ann(owner), Priority.OTHER).table
    assert table.total_bytes == 3 * unit
    # Needs the room of two small ones.
    big_size = 2 * unit - (stored_bytes(200) - 200)
    assert stored_bytes(big_size) == 2 * unit
    update = offer(table, _ann(OWNERS[3], size=big_size), Priority.OTHER)
    assert update.outcome is OfferOutcome.ADMITTED
    assert update.evict == (_ann(OWNERS[0]), _ann(OWNERS[1]))
    assert update.table.total_bytes == 3 * unit
    # Larger than the whole table: ignored.
    too_big = offer(table, _ann(OWNERS[4], size=3 * unit), Priority.THREAD_PEER)
    assert too_big.outcome is OfferOutcome.NO_ROOM and too_big.table is table


def test_a_replacement_that_does_not_fit_keeps_the_old_backup() -> None:
    unit = stored_bytes(100)
    table = ReplicaTable(ALICE.address, max_owners=10, max_bytes=2 * unit)
    table = offer(table, _ann(OWNERS[0]), Priority.THREAD_PEER).table
    table = offer(table, _ann(OWNERS[1]), Priority.THREAD_PEER).table
    grown = offer(table, _ann(OWNERS[1], 2, size=unit + 1), Priority.OTHER)
    assert grown.outcome is OfferOutcome.NO_ROOM and grown.table is table


def test_forget_drops_a_replica() -> None:
    table = ReplicaTable(ALICE.address, max_owners=4, max_bytes=1 << 20)
    table = offer(table, _ann(BOB), Priority.OTHER).table
    after, dropped = forget(table, BOB.address)
    assert dropped == _ann(BOB) and after.replicas == ()
    assert forget(after, BOB.address) == (after, None)


def test_table_validates_its_invariants() -> None:
    table = offer(ReplicaTable(ALICE.address, 4, 1 << 20), _ann(BOB), Priority.OTHER).table
    with pytest.raises(InvalidValue):
        dataclasses.replace(table, me=BOB.address)
    with pytest.raises(InvalidValue):
        dataclasses.replace(table, max_owners=0)
    with pytest.raises(InvalidValue):
        dataclasses.replace(table, replicas=table.replicas * 2)
    with pytest.raises(InvalidValue):
        ReplicaTable(ALICE.address, -1, 0)


@settings(max_examples=60)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.lists(
        st.tuples(
            st.integers(0, 6), st.integers(1, 5), st.integers(1, 400), st.sampled_from(Priority)
        ),
        max_size=40,
    ),
)
def test_replica_table_invariants_under_any_offers(
    max_owners: int, max_units: int, offers: list[tuple[int, int, int, Priority]]
) -> None:
    me = OWNERS[0].address
    table = ReplicaTable(me, max_owners, max_units * stored_bytes(200))
    pinned: set[Announcement] = set()
    highest: dict[Address, int] = {}
    for index, sequence, size, priority in offers:
        owner = OWNERS[index]
        announcement = make_announcement(
            owner, DOMAIN, sequence, cid_of(bytes([index, sequence, size % 256])), size
        )
        previous = table
        before = previous.get(owner.address)
        update = offer(previous, announcement, priority)
        for evicted in update.evict:
            pinned.remove(evicted)
        if update.fetch is not None:
            pinned.add(update.fetch)
        table = update.table
        # What the node pins is exactly what the table keeps.
        assert pinned == {r.announcement for r in table.replicas}
        assert len(table.replicas) <= max_owners and table.total_bytes <= table.max_bytes
        assert table.get(me) is None
        kept = table.get(owner.address)
        if owner.address == me:
            assert update.outcome is OfferOutcome.OWN
        elif before is not None and sequence <= before.announcement.sequence:
            assert update.outcome is OfferOutcome.STALE and update.table is previous
        elif update.fetch is not None:
            assert kept is not None and kept.announcement == announcement
        # While an owner stays kept, its sequence never goes down (an evicted owner is
        # forgotten: the table keeps no memory of it).
        for evicted in update.evict:
            if evicted.owner != owner.address:
                del highest[evicted.owner]
        for replica in table.replicas:
            assert replica.announcement.sequence >= highest.get(replica.owner, 0)
            highest[replica.owner] = replica.announcement.sequence
        # Only owners of no higher priority are evicted for a newcomer.
        for evicted in update.evict:
            if evicted.owner != owner.address:
                victim = previous.get(evicted.owner)
                assert victim is not None and victim.priority <= priority


# ---------------------------------------------------------------- recovery choice


def test_recovery_picks_the_newest_valid_announcement() -> None:
    own = [_ann(ALICE, 3), _ann(ALICE, 7), _ann(ALICE, 5)]
    forged_newer = dataclasses.replace(_ann(MALLORY, 99), owner=ALICE.address)
    someone_else = _ann(BOB, 50)
    other_domain = make_announcement(ALICE, OTHER_DOMAIN, 60, cid_of(b"x"), 100)
    seen = [*own, forged_newer, someone_else, other_domain, _ann(ALICE, 7)]
    assert choose_backup(seen, ALICE.address, DOMAIN, max_size=1 << 20) == _ann(ALICE, 7)
    assert rank_backups(seen, ALICE.address, DOMAIN, 1 << 20) == (
        _ann(ALICE, 7),
        _ann(ALICE, 5),
        _ann(ALICE, 3),
    )
    assert choose_backup([forged_newer, someone_else], ALICE.address, DOMAIN, 1 << 20) is None
    assert choose_backup([], ALICE.address, DOMAIN, 1 << 20) is None
    # Over the size cap: not chosen.
    big = _ann(ALICE, 8, size=5000)
    assert choose_backup([*own, big], ALICE.address, DOMAIN, max_size=1000) == _ann(ALICE, 7)


def test_recovery_refuses_content_older_than_an_announcement_seen() -> None:
    content = alice_content(sequence=5)
    check_not_stale(content, [_ann(ALICE, 5), _ann(ALICE, 4)], DOMAIN)
    check_not_stale(content, [], DOMAIN)
    # Forged, other owners' and other domains' announcements do not count.
    forged = dataclasses.replace(_ann(MALLORY, 9), owner=ALICE.address)
    foreign = make_announcement(ALICE, OTHER_DOMAIN, 9, cid_of(b"x"), 100)
    check_not_stale(content, [forged, _ann(BOB, 9), foreign], DOMAIN)
    # A real newer one does, even one too large to fetch.
    for newer in (_ann(ALICE, 6), _ann(ALICE, 6, size=MAX_SEALED_BYTES + 1)):
        with pytest.raises(StaleBackup) as info:
            check_not_stale(content, [_ann(ALICE, 5), newer], DOMAIN)
        assert info.value.reason is BackupReason.STALE


def test_recovery_end_to_end_from_several_peers() -> None:
    # Two peers hold different backups of Alice; she has only her key.
    old_ann, old_blocks = blocks_of(alice_content(sequence=2))
    new_ann, new_blocks = blocks_of(alice_content(sequence=3))
    seen = [old_ann, new_ann, old_ann]
    store = {**old_blocks, **new_blocks}
    chosen = choose_backup(seen, ALICE.address, DOMAIN, 1 << 20)
    assert chosen == new_ann
    sealed = from_blocks(chosen.root_cid, store.get, chosen.size)
    content = open_backup(backup_key(ALICE_KEY), sealed, chosen, DOMAIN)
    check_not_stale(content, seen, DOMAIN)
    assert content == alice_content(sequence=3)
    stale = open_backup(KEY, from_blocks(old_ann.root_cid, store.get), old_ann, DOMAIN)
    with pytest.raises(StaleBackup):
        check_not_stale(stale, seen, DOMAIN)


def test_pack_backup_refuses_someone_elses_content() -> None:
    with pytest.raises(LocalProtocolError):
        pack_backup(KEY, NONCE, alice_content(), BOB)


def test_seal_backup_uses_the_contents_own_aad() -> None:
    content = alice_content(sequence=4)
    sealed = seal_backup(KEY, NONCE, content)
    assert unseal(KEY, sealed, backup_aad(DOMAIN, ALICE.address, 4)) == encode_content(content)


def test_unchecked_huge_announcement_is_not_kept() -> None:
    table = ReplicaTable(ALICE.address, max_owners=4, max_bytes=2**64)
    huge = _ann(BOB, size=MAX_SEALED_BYTES + 1)
    assert offer(table, huge, Priority.THREAD_PEER).outcome is OfferOutcome.NO_ROOM


def test_a_locally_built_unsigned_channel_is_refused() -> None:
    unsigned = dataclasses.replace(
        alice_content(), channels=(SignedChannelState(genesis_state(ALICE.address), None, None),)
    )
    with pytest.raises(InvalidEntry, match="both signatures"):
        check_content(unsigned, ALICE.address, DOMAIN)


def test_spec_test_vectors() -> None:
    # The vectors printed in SPEC.md ("Backups", "Test vectors").
    a = Address(b"\x11" * 20)
    empty_cid = "01551220e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert cid_of(b"").hex() == empty_cid
    assert backup_key((1).to_bytes(32, "big")).hex() == (
        "0edccd46fdaa62caf674fc76ed0a357ca0d4eb90a55f007bff6ec47701dc7b95"
    )
    assert announcement_digest(DOMAIN, a, 5, cid_of(b""), 1000).hex() == (
        "69d5800cd9a8e996409996a3d8b414e2f4c0843f6de817bfa6d1804090989477"
    )
    assert encode_root(BackupRoot(1000, (cid_of(b""),))).hex() == "93010292cd03e891c424" + empty_cid
    assert backup_aad(DOMAIN, a, 5) == (
        b"weft backup aad v1"
        + (1337).to_bytes(32, "big")
        + b"\xc0" * 20
        + a.raw
        + bytes(7)
        + b"\x05"
    )
