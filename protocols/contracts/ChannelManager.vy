# pragma version 0.4.3
# @license MIT
"""
@title Weft ChannelManager
@notice Holds ETH and one ERC20 token for the channels between one hub and its users,
        executes double-signed channel states, and settles channels and threads in disputes.
@dev The rules are protocols/SPEC.md, "On-chain rules". A channel's on-chain data lives in
     calldata: the contract stores only keccak256(abi_encode(ChannelRecord)) per user, and
     every call that touches a channel is given the current record, which it checks against
     that hash. Every change of a record is logged in full (ChannelRecordChanged), so a
     watcher rebuilds the current record from the logs alone. Thread disputes are stored the
     same way, keyed by the thread's leaf hash.
"""

from ethereum.ercs import IERC20

# --- Typed data (protocols/SPEC.md, "Signatures") -------------------------------------

struct ChannelState:
    user: address
    recipient: address
    balanceEthHub: uint256
    balanceEthUser: uint256
    balanceTokenHub: uint256
    balanceTokenUser: uint256
    pendingDepositEthHub: uint256
    pendingDepositEthUser: uint256
    pendingDepositTokenHub: uint256
    pendingDepositTokenUser: uint256
    pendingWithdrawalEthHub: uint256
    pendingWithdrawalEthUser: uint256
    pendingWithdrawalTokenHub: uint256
    pendingWithdrawalTokenUser: uint256
    txCountGlobal: uint256
    txCountOnchain: uint256
    threadRoot: bytes32
    threadCount: uint256
    timeout: uint256

struct ThreadState:
    threadId: uint256
    sender: address
    receiver: address
    balanceEthSender: uint256
    balanceEthReceiver: uint256
    balanceTokenSender: uint256
    balanceTokenReceiver: uint256
    txCount: uint256

# --- What the contract knows of a channel ----------------------------------------------

# Channel phases.
OPEN: constant(uint256) = 0
EXITING: constant(uint256) = 1
CHALLENGED: constant(uint256) = 2
SETTLING_THREADS: constant(uint256) = 3

struct ChannelRecord:
    # Funds the contract holds for the channel: both balances plus what its threads lock.
    heldEth: uint256
    heldToken: uint256
    # OPEN: balances at rest after the last executed update. EXITING/CHALLENGED: the
    # balances of the state under dispute. SETTLING_THREADS: zero (paid out).
    balanceEthHub: uint256
    balanceEthUser: uint256
    balanceTokenHub: uint256
    balanceTokenUser: uint256
    # Highest txCountGlobal the contract has accepted for this channel.
    txCountGlobal: uint256
    # txCountOnchain of the last executed authorized update.
    txCountOnchain: uint256
    threadRoot: bytes32
    threadCount: uint256
    # EXITING/CHALLENGED: when the challenge period ends. Otherwise 0.
    exitDeadline: uint256
    phase: uint256

struct ThreadDispute:
    balanceEthSender: uint256
    balanceEthReceiver: uint256
    balanceTokenSender: uint256
    balanceTokenReceiver: uint256
    txCount: uint256
    deadline: uint256
    challenged: bool

# --- Events ------------------------------------------------------------------------------

event ReserveDeposited:
    amountEth: uint256
    amountToken: uint256
    reserveEth: uint256
    reserveToken: uint256

event ReserveWithdrawn:
    recipient: indexed(address)
    amountEth: uint256
    amountToken: uint256
    reserveEth: uint256
    reserveToken: uint256

# Every change of a channel record; `action` names the function that made it.
event ChannelRecordChanged:
    user: indexed(address)
    action: indexed(uint256)
    caller: address
    record: ChannelRecord

event ChannelPaidOut:
    user: indexed(address)
    userEth: uint256
    userToken: uint256
    hubEth: uint256
    hubToken: uint256

# A channel's exit is complete; what its parties left unassigned went to the reserve.
event ChannelReopened:
    user: indexed(address)
    unassignedEth: uint256
    unassignedToken: uint256

event ThreadDisputeChanged:
    leaf: indexed(bytes32)
    action: indexed(uint256)
    caller: address
    sender: address
    receiver: address
    threadId: uint256
    dispute: ThreadDispute

event ThreadSettled:
    user: indexed(address)
    leaf: indexed(bytes32)
    userEth: uint256
    userToken: uint256
    hubEth: uint256
    hubToken: uint256

event PayoutDeferred:
    recipient: indexed(address)
    amountEth: uint256
    amountToken: uint256

event PayoutClaimed:
    recipient: indexed(address)
    to: indexed(address)
    amountEth: uint256
    amountToken: uint256

# `action` codes of ChannelRecordChanged and ThreadDisputeChanged.
ACTION_HUB_UPDATE: constant(uint256) = 1
ACTION_USER_UPDATE: constant(uint256) = 2
ACTION_START_EXIT: constant(uint256) = 3
ACTION_CHALLENGE_EXIT: constant(uint256) = 4
ACTION_EMPTY_CHANNEL: constant(uint256) = 5
ACTION_START_THREAD_EXIT: constant(uint256) = 6
ACTION_CHALLENGE_THREAD: constant(uint256) = 7
ACTION_SETTLE_THREAD: constant(uint256) = 8

# --- Constants -----------------------------------------------------------------------

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
NAME_HASH: constant(bytes32) = keccak256("Weft")
VERSION_HASH: constant(bytes32) = keccak256("1")
CHANNEL_STATE_TYPEHASH: constant(bytes32) = keccak256(
    "ChannelState(address user,address recipient,uint256 balanceEthHub,uint256 balanceEthUser,uint256 balanceTokenHub,uint256 balanceTokenUser,uint256 pendingDepositEthHub,uint256 pendingDepositEthUser,uint256 pendingDepositTokenHub,uint256 pendingDepositTokenUser,uint256 pendingWithdrawalEthHub,uint256 pendingWithdrawalEthUser,uint256 pendingWithdrawalTokenHub,uint256 pendingWithdrawalTokenUser,uint256 txCountGlobal,uint256 txCountOnchain,bytes32 threadRoot,uint256 threadCount,uint256 timeout)"
)
THREAD_STATE_TYPEHASH: constant(bytes32) = keccak256(
    "ThreadState(uint256 threadId,address sender,address receiver,uint256 balanceEthSender,uint256 balanceEthReceiver,uint256 balanceTokenSender,uint256 balanceTokenReceiver,uint256 txCount)"
)
# secp256k1 group order / 2: the largest low-s value.
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
MAX_PROOF: constant(uint256) = 32
# Gas an ETH payout may use in its recipient, so no recipient can burn the caller's gas;
# a recipient that needs more claims its payout instead (claim).
PAYOUT_GAS: constant(uint256) = 50000

# --- Storage ---------------------------------------------------------------------------

hub: public(immutable(address))
token: public(immutable(IERC20))
challengePeriod: public(immutable(uint256))
GENESIS_RECORD_HASH: immutable(bytes32)

reserveEth: public(uint256)
reserveToken: public(uint256)
# user => keccak256(abi_encode(ChannelRecord)); 0 means the genesis record (all zero).
channelRecordHash: public(HashMap[address, bytes32])
# thread leaf => keccak256(abi_encode(ThreadDispute)); 0 means no dispute.
threadDisputeHash: public(HashMap[bytes32, bytes32])
# keccak256(user, leaf) => True once the thread is paid out in that user's channel.
threadSettled: public(HashMap[bytes32, bool])
# Payouts a recipient refused (a reverting receiver, a refused token transfer), to claim.
unclaimedEth: public(HashMap[address, uint256])
unclaimedToken: public(HashMap[address, uint256])


@deploy
def __init__(_hub: address, _token: address, _challengePeriod: uint256):
    assert _hub != empty(address), "hub is the zero address"
    assert _token.is_contract, "token is not a contract"
    assert _challengePeriod > 0, "challenge period is zero"
    hub = _hub
    token = IERC20(_token)
    challengePeriod = _challengePeriod
    GENESIS_RECORD_HASH = keccak256(abi_encode(empty(ChannelRecord)))


# --- Views ---------------------------------------------------------------------------


@view
@external
def domainSeparator() -> bytes32:
    return self._domain_separator()


@view
@external
def channelStateDigest(state: ChannelState) -> bytes32:
    return self._channel_digest(state)


@view
@external
def threadStateDigest(state: ThreadState) -> bytes32:
    return self._thread_digest(state)


@pure
@external
def threadLeaf(state: ThreadState) -> bytes32:
    return self._thread_leaf(state)


@view
@external
def recordHash(record: ChannelRecord) -> bytes32:
    """The value channelRecordHash holds for `record` (0 for the genesis record)."""
    return self._record_hash(record)


# --- Hub reserve ---------------------------------------------------------------------


@payable
@external
@nonreentrant
def hubDeposit(amountToken: uint256):
    """Add msg.value wei and `amountToken` tokens (pulled from the hub) to the reserve."""
    assert msg.sender == hub, "caller is not the hub"
    assert msg.value > 0 or amountToken > 0, "nothing to deposit"
    self.reserveEth += msg.value
    self.reserveToken += amountToken
    if amountToken > 0:
        self._pull_token(msg.sender, amountToken)
    log ReserveDeposited(
        amountEth=msg.value,
        amountToken=amountToken,
        reserveEth=self.reserveEth,
        reserveToken=self.reserveToken,
    )


@external
@nonreentrant
def hubWithdraw(recipient: address, amountEth: uint256, amountToken: uint256):
    """Pay from the reserve to `recipient`."""
    assert msg.sender == hub, "caller is not the hub"
    assert recipient != empty(address), "recipient is the zero address"
    assert amountEth > 0 or amountToken > 0, "nothing to withdraw"
    assert amountEth <= self.reserveEth, "reserve too low (eth)"
    assert amountToken <= self.reserveToken, "reserve too low (token)"
    self.reserveEth -= amountEth
    self.reserveToken -= amountToken
    log ReserveWithdrawn(
        recipient=recipient,
        amountEth=amountEth,
        amountToken=amountToken,
        reserveEth=self.reserveEth,
        reserveToken=self.reserveToken,
    )
    self._pay(recipient, amountEth, amountToken)


@external
@nonreentrant
def claim(to: address):
    """Pay the caller's deferred payouts to `to`."""
    assert to != empty(address), "recipient is the zero address"
    amountEth: uint256 = self.unclaimedEth[msg.sender]
    amountToken: uint256 = self.unclaimedToken[msg.sender]
    assert amountEth > 0 or amountToken > 0, "nothing to claim"
    self.unclaimedEth[msg.sender] = 0
    self.unclaimedToken[msg.sender] = 0
    log PayoutClaimed(recipient=msg.sender, to=to, amountEth=amountEth, amountToken=amountToken)
    self._pay(to, amountEth, amountToken)


# --- Authorized updates --------------------------------------------------------------


@external
@nonreentrant
def hubAuthorizedUpdate(
    record: ChannelRecord, state: ChannelState, sigHub: Bytes[65], sigUser: Bytes[65]
):
    """Execute the pending operations of a double-signed state, sent by the hub.

    Hub deposits come from the reserve; the user may not deposit through the hub.
    """
    assert msg.sender == hub, "caller is not the hub"
    assert state.pendingDepositEthUser == 0, "user deposit in hub update"
    assert state.pendingDepositTokenUser == 0, "user deposit in hub update"
    self._authorized_update(record, state, sigHub, sigUser, ACTION_HUB_UPDATE)


@payable
@external
@nonreentrant
def userAuthorizedUpdate(
    record: ChannelRecord, state: ChannelState, sigHub: Bytes[65], sigUser: Bytes[65]
):
    """Execute the pending operations of a double-signed state, sent by its user.

    msg.value must equal the user's pending ETH deposit; the user's pending token deposit
    is pulled from the user (approve it first). Hub deposits come from the reserve.
    """
    assert msg.sender == state.user, "caller is not the channel's user"
    assert msg.value == state.pendingDepositEthUser, "msg.value is not the user's eth deposit"
    self._authorized_update(record, state, sigHub, sigUser, ACTION_USER_UPDATE)
    if state.pendingDepositTokenUser > 0:
        self._pull_token(state.user, state.pendingDepositTokenUser)


@internal
def _authorized_update(
    record: ChannelRecord,
    state: ChannelState,
    sigHub: Bytes[65],
    sigUser: Bytes[65],
    action: uint256,
):
    user: address = state.user
    self._check_record(user, record)
    assert record.phase == OPEN, "channel is not open"
    assert state.txCountGlobal > record.txCountGlobal, "stale txCountGlobal"
    assert state.txCountOnchain > record.txCountOnchain, "stale txCountOnchain"
    assert block.timestamp < state.timeout, "update timed out"
    self._check_channel_signatures(state, sigHub, sigUser)

    depositEth: uint256 = state.pendingDepositEthHub + state.pendingDepositEthUser
    depositToken: uint256 = state.pendingDepositTokenHub + state.pendingDepositTokenUser
    withdrawEth: uint256 = state.pendingWithdrawalEthHub + state.pendingWithdrawalEthUser
    withdrawToken: uint256 = state.pendingWithdrawalTokenHub + state.pendingWithdrawalTokenUser
    assert record.heldEth + depositEth >= withdrawEth, "withdrawals exceed channel funds"
    assert record.heldToken + depositToken >= withdrawToken, "withdrawals exceed channel funds"
    heldEth: uint256 = record.heldEth + depositEth - withdrawEth
    heldToken: uint256 = record.heldToken + depositToken - withdrawToken
    balanceEthHub: uint256 = state.balanceEthHub + state.pendingDepositEthHub
    balanceEthUser: uint256 = state.balanceEthUser + state.pendingDepositEthUser
    balanceTokenHub: uint256 = state.balanceTokenHub + state.pendingDepositTokenHub
    balanceTokenUser: uint256 = state.balanceTokenUser + state.pendingDepositTokenUser
    assert balanceEthHub + balanceEthUser <= heldEth, "state exceeds channel funds"
    assert balanceTokenHub + balanceTokenUser <= heldToken, "state exceeds channel funds"

    # Hub deposits move from the reserve into the channel; hub withdrawals move back.
    # (Untouched when the hub moves nothing: two cold storage reads saved per deposit.)
    if state.pendingDepositEthHub > 0 or state.pendingWithdrawalEthHub > 0:
        assert self.reserveEth >= state.pendingDepositEthHub, "reserve too low (eth)"
        self.reserveEth = (
            self.reserveEth - state.pendingDepositEthHub + state.pendingWithdrawalEthHub
        )
    if state.pendingDepositTokenHub > 0 or state.pendingWithdrawalTokenHub > 0:
        assert self.reserveToken >= state.pendingDepositTokenHub, "reserve too low (token)"
        self.reserveToken = (
            self.reserveToken - state.pendingDepositTokenHub + state.pendingWithdrawalTokenHub
        )

    new: ChannelRecord = ChannelRecord(
        heldEth=heldEth,
        heldToken=heldToken,
        balanceEthHub=balanceEthHub,
        balanceEthUser=balanceEthUser,
        balanceTokenHub=balanceTokenHub,
        balanceTokenUser=balanceTokenUser,
        txCountGlobal=state.txCountGlobal,
        txCountOnchain=state.txCountOnchain,
        threadRoot=state.threadRoot,
        threadCount=state.threadCount,
        exitDeadline=0,
        phase=OPEN,
    )
    self._store_record(user, new, action)
    if state.pendingWithdrawalEthUser > 0 or state.pendingWithdrawalTokenUser > 0:
        assert state.recipient != empty(address), "recipient is the zero address"
        self._pay_or_defer(
            state.recipient, state.pendingWithdrawalEthUser, state.pendingWithdrawalTokenUser
        )


# --- Channel exit --------------------------------------------------------------------


@external
@nonreentrant
def startExit(user: address, record: ChannelRecord):
    """Start a channel's exit at its on-chain balances (hub or user only)."""
    assert msg.sender == hub or msg.sender == user, "caller is not a party of the channel"
    self._check_record(user, record)
    assert record.phase == OPEN, "channel is not open"
    new: ChannelRecord = record
    new.exitDeadline = block.timestamp + challengePeriod
    new.phase = EXITING
    self._store_record(user, new, ACTION_START_EXIT)


@external
@nonreentrant
def startExitWithUpdate(
    record: ChannelRecord, state: ChannelState, sigHub: Bytes[65], sigUser: Bytes[65]
):
    """Start a channel's exit at a newer double-signed state (hub or user only)."""
    user: address = state.user
    assert msg.sender == hub or msg.sender == user, "caller is not a party of the channel"
    self._check_record(user, record)
    assert record.phase == OPEN, "channel is not open"
    new: ChannelRecord = self._disputed_record(record, state, sigHub, sigUser)
    new.exitDeadline = block.timestamp + challengePeriod
    new.phase = EXITING
    self._store_record(user, new, ACTION_START_EXIT)


@external
@nonreentrant
def challengeExit(
    record: ChannelRecord, state: ChannelState, sigHub: Bytes[65], sigUser: Bytes[65]
):
    """Replace the state under dispute with a later double-signed one (anyone).

    Any number of challenges may come before the deadline, each with a higher
    txCountGlobal than the state it replaces; the deadline does not move. (A single
    challenge would let the exit's starter take it with another old state.)
    """
    user: address = state.user
    self._check_record(user, record)
    assert record.phase == EXITING or record.phase == CHALLENGED, "channel is not exiting"
    assert block.timestamp < record.exitDeadline, "challenge period over"
    new: ChannelRecord = self._disputed_record(record, state, sigHub, sigUser)
    new.exitDeadline = record.exitDeadline
    new.phase = CHALLENGED
    self._store_record(user, new, ACTION_CHALLENGE_EXIT)


@external
@nonreentrant
def emptyChannel(user: address, record: ChannelRecord):
    """After the challenge period, pay out the disputed balances (anyone).

    The user's balances go to the user, the hub's to the reserve. What the channel's
    threads lock stays held until each thread is settled (settleThread).
    """
    self._check_record(user, record)
    assert record.phase == EXITING or record.phase == CHALLENGED, "channel is not exiting"
    assert block.timestamp >= record.exitDeadline, "challenge period not over"
    new: ChannelRecord = record
    new.heldEth = record.heldEth - record.balanceEthHub - record.balanceEthUser
    new.heldToken = record.heldToken - record.balanceTokenHub - record.balanceTokenUser
    new.balanceEthHub = 0
    new.balanceEthUser = 0
    new.balanceTokenHub = 0
    new.balanceTokenUser = 0
    new.exitDeadline = 0
    new.phase = SETTLING_THREADS
    self._to_reserve(record.balanceEthHub, record.balanceTokenHub)
    if new.threadCount == 0:
        new = self._reopen(user, new)
    self._store_record(user, new, ACTION_EMPTY_CHANNEL)
    log ChannelPaidOut(
        user=user,
        userEth=record.balanceEthUser,
        userToken=record.balanceTokenUser,
        hubEth=record.balanceEthHub,
        hubToken=record.balanceTokenHub,
    )
    self._pay_or_defer(user, record.balanceEthUser, record.balanceTokenUser)


# --- Thread exit ---------------------------------------------------------------------


@external
@nonreentrant
def startThreadExit(
    user: address, record: ChannelRecord, initial: ThreadState, proof: DynArray[bytes32, MAX_PROOF]
):
    """Open a thread's dispute at its initial state (hub or the channel's user).

    The channel must be settling its threads and hold `initial` under its thread root.
    """
    leaf: bytes32 = self._start_thread_checks(user, record, initial, proof)
    dispute: ThreadDispute = ThreadDispute(
        balanceEthSender=initial.balanceEthSender,
        balanceEthReceiver=initial.balanceEthReceiver,
        balanceTokenSender=initial.balanceTokenSender,
        balanceTokenReceiver=initial.balanceTokenReceiver,
        txCount=0,
        deadline=block.timestamp + challengePeriod,
        challenged=False,
    )
    self._store_dispute(leaf, initial, dispute, ACTION_START_THREAD_EXIT)


@external
@nonreentrant
def startThreadExitWithUpdate(
    user: address,
    record: ChannelRecord,
    initial: ThreadState,
    proof: DynArray[bytes32, MAX_PROOF],
    latest: ThreadState,
    sigSender: Bytes[65],
    sigReceiver: Bytes[65],
):
    """Open a thread's dispute at a later double-signed state (hub or the channel's user)."""
    leaf: bytes32 = self._start_thread_checks(user, record, initial, proof)
    self._check_thread_successor(initial, latest, 0, sigSender, sigReceiver)
    dispute: ThreadDispute = ThreadDispute(
        balanceEthSender=latest.balanceEthSender,
        balanceEthReceiver=latest.balanceEthReceiver,
        balanceTokenSender=latest.balanceTokenSender,
        balanceTokenReceiver=latest.balanceTokenReceiver,
        txCount=latest.txCount,
        deadline=block.timestamp + challengePeriod,
        challenged=False,
    )
    self._store_dispute(leaf, initial, dispute, ACTION_START_THREAD_EXIT)


@external
@nonreentrant
def challengeThread(
    initial: ThreadState,
    dispute: ThreadDispute,
    latest: ThreadState,
    sigSender: Bytes[65],
    sigReceiver: Bytes[65],
):
    """Replace a thread dispute's state with a later double-signed one (anyone).

    As with channel exits, challenges may repeat before the deadline, each with a higher
    txCount; the deadline does not move.
    """
    leaf: bytes32 = self._thread_leaf(initial)
    self._check_dispute(leaf, dispute)
    assert block.timestamp < dispute.deadline, "challenge period over"
    self._check_thread_successor(initial, latest, dispute.txCount, sigSender, sigReceiver)
    new: ThreadDispute = ThreadDispute(
        balanceEthSender=latest.balanceEthSender,
        balanceEthReceiver=latest.balanceEthReceiver,
        balanceTokenSender=latest.balanceTokenSender,
        balanceTokenReceiver=latest.balanceTokenReceiver,
        txCount=latest.txCount,
        deadline=dispute.deadline,
        challenged=True,
    )
    self._store_dispute(leaf, initial, new, ACTION_CHALLENGE_THREAD)


@external
@nonreentrant
def settleThread(
    user: address,
    record: ChannelRecord,
    initial: ThreadState,
    proof: DynArray[bytes32, MAX_PROOF],
    dispute: ThreadDispute,
):
    """Pay a thread out of a settling channel at its dispute's final state (anyone).

    In the channel of the user who is the thread's sender, the user gets the sender's
    balance and the hub the receiver's; in the receiver's channel, the reverse. The last
    thread settled reopens the channel.
    """
    assert user == initial.sender or user == initial.receiver, "user is not a party of the thread"
    self._check_record(user, record)
    assert record.phase == SETTLING_THREADS, "channel is not settling threads"
    leaf: bytes32 = self._thread_leaf(initial)
    assert self._verify_proof(record.threadRoot, leaf, proof), "thread not in the channel's root"
    self._check_dispute(leaf, dispute)
    assert block.timestamp >= dispute.deadline, "challenge period not over"
    settledKey: bytes32 = keccak256(concat(convert(user, bytes20), leaf))
    assert not self.threadSettled[settledKey], "thread already settled in this channel"
    self.threadSettled[settledKey] = True

    userEth: uint256 = 0
    userToken: uint256 = 0
    hubEth: uint256 = 0
    hubToken: uint256 = 0
    if user == initial.sender:
        userEth = dispute.balanceEthSender
        userToken = dispute.balanceTokenSender
        hubEth = dispute.balanceEthReceiver
        hubToken = dispute.balanceTokenReceiver
    else:
        userEth = dispute.balanceEthReceiver
        userToken = dispute.balanceTokenReceiver
        hubEth = dispute.balanceEthSender
        hubToken = dispute.balanceTokenSender
    assert userEth + hubEth <= record.heldEth, "thread exceeds channel funds"
    assert userToken + hubToken <= record.heldToken, "thread exceeds channel funds"

    new: ChannelRecord = record
    new.heldEth = record.heldEth - userEth - hubEth
    new.heldToken = record.heldToken - userToken - hubToken
    new.threadCount = record.threadCount - 1
    self._to_reserve(hubEth, hubToken)
    if new.threadCount == 0:
        new = self._reopen(user, new)
    self._store_record(user, new, ACTION_SETTLE_THREAD)
    log ThreadSettled(
        user=user, leaf=leaf, userEth=userEth, userToken=userToken, hubEth=hubEth, hubToken=hubToken
    )
    self._pay_or_defer(user, userEth, userToken)


# --- Internals: records ---------------------------------------------------------------


@view
@internal
def _record_hash(record: ChannelRecord) -> bytes32:
    h: bytes32 = keccak256(abi_encode(record))
    if h == GENESIS_RECORD_HASH:
        return empty(bytes32)
    return h


@view
@internal
def _check_record(user: address, record: ChannelRecord):
    assert user != empty(address), "user is the zero address"
    assert self._record_hash(record) == self.channelRecordHash[user], "record is not the channel's current record"


@internal
def _store_record(user: address, record: ChannelRecord, action: uint256):
    self.channelRecordHash[user] = self._record_hash(record)
    log ChannelRecordChanged(user=user, action=action, caller=msg.sender, record=record)


@internal
def _reopen(user: address, record: ChannelRecord) -> ChannelRecord:
    """The channel after its exit: open and empty, nonces kept so no old state replays.

    Anything still held (only if the parties signed balances below the channel's funds)
    goes to the hub's reserve.
    """
    self._to_reserve(record.heldEth, record.heldToken)
    log ChannelReopened(user=user, unassignedEth=record.heldEth, unassignedToken=record.heldToken)
    return ChannelRecord(
        heldEth=0,
        heldToken=0,
        balanceEthHub=0,
        balanceEthUser=0,
        balanceTokenHub=0,
        balanceTokenUser=0,
        txCountGlobal=record.txCountGlobal,
        txCountOnchain=record.txCountOnchain,
        threadRoot=empty(bytes32),
        threadCount=0,
        exitDeadline=0,
        phase=OPEN,
    )


@view
@internal
def _disputed_record(
    record: ChannelRecord, state: ChannelState, sigHub: Bytes[65], sigUser: Bytes[65]
) -> ChannelRecord:
    """The record with `state` under dispute, after checking `state` may replace it.

    A state whose pending update the contract executed (same txCountOnchain) counts its
    pending deposits as credited; a state whose pending update was not executed (higher
    txCountOnchain) gets its pending withdrawals back. Deposits not executed never count.
    """
    assert state.txCountGlobal > record.txCountGlobal, "stale txCountGlobal"
    assert state.txCountOnchain >= record.txCountOnchain, "stale txCountOnchain"
    self._check_channel_signatures(state, sigHub, sigUser)
    new: ChannelRecord = record
    if state.txCountOnchain == record.txCountOnchain:
        new.balanceEthHub = state.balanceEthHub + state.pendingDepositEthHub
        new.balanceEthUser = state.balanceEthUser + state.pendingDepositEthUser
        new.balanceTokenHub = state.balanceTokenHub + state.pendingDepositTokenHub
        new.balanceTokenUser = state.balanceTokenUser + state.pendingDepositTokenUser
    else:
        new.balanceEthHub = state.balanceEthHub + state.pendingWithdrawalEthHub
        new.balanceEthUser = state.balanceEthUser + state.pendingWithdrawalEthUser
        new.balanceTokenHub = state.balanceTokenHub + state.pendingWithdrawalTokenHub
        new.balanceTokenUser = state.balanceTokenUser + state.pendingWithdrawalTokenUser
    assert new.balanceEthHub + new.balanceEthUser <= record.heldEth, "state exceeds channel funds"
    assert new.balanceTokenHub + new.balanceTokenUser <= record.heldToken, "state exceeds channel funds"
    new.txCountGlobal = state.txCountGlobal
    new.threadRoot = state.threadRoot
    new.threadCount = state.threadCount
    return new


# --- Internals: threads ----------------------------------------------------------------


@view
@internal
def _start_thread_checks(
    user: address, record: ChannelRecord, initial: ThreadState, proof: DynArray[bytes32, MAX_PROOF]
) -> bytes32:
    assert msg.sender == hub or msg.sender == user, "caller is not a party of the channel"
    assert user == initial.sender or user == initial.receiver, "user is not a party of the thread"
    assert initial.txCount == 0, "initial state has a non-zero txCount"
    self._check_record(user, record)
    assert record.phase == SETTLING_THREADS, "channel is not settling threads"
    leaf: bytes32 = self._thread_leaf(initial)
    assert self._verify_proof(record.threadRoot, leaf, proof), "thread not in the channel's root"
    assert self.threadDisputeHash[leaf] == empty(bytes32), "thread dispute already started"
    return leaf


@view
@internal
def _check_thread_successor(
    initial: ThreadState,
    latest: ThreadState,
    minTxCount: uint256,
    sigSender: Bytes[65],
    sigReceiver: Bytes[65],
):
    assert latest.threadId == initial.threadId, "not the same thread"
    assert latest.sender == initial.sender, "not the same thread"
    assert latest.receiver == initial.receiver, "not the same thread"
    assert latest.txCount > minTxCount, "stale thread txCount"
    assert (
        latest.balanceEthSender + latest.balanceEthReceiver
        == initial.balanceEthSender + initial.balanceEthReceiver
    ), "thread total changed"
    assert (
        latest.balanceTokenSender + latest.balanceTokenReceiver
        == initial.balanceTokenSender + initial.balanceTokenReceiver
    ), "thread total changed"
    digest: bytes32 = self._thread_digest(latest)
    assert self._signed_by(digest, sigSender, latest.sender), "bad sender signature"
    assert self._signed_by(digest, sigReceiver, latest.receiver), "bad receiver signature"


@view
@internal
def _check_dispute(leaf: bytes32, dispute: ThreadDispute):
    stored: bytes32 = self.threadDisputeHash[leaf]
    assert stored != empty(bytes32), "no dispute for this thread"
    assert keccak256(abi_encode(dispute)) == stored, "dispute is not the thread's current dispute"


@internal
def _store_dispute(leaf: bytes32, initial: ThreadState, dispute: ThreadDispute, action: uint256):
    self.threadDisputeHash[leaf] = keccak256(abi_encode(dispute))
    log ThreadDisputeChanged(
        leaf=leaf,
        action=action,
        caller=msg.sender,
        sender=initial.sender,
        receiver=initial.receiver,
        threadId=initial.threadId,
        dispute=dispute,
    )


@pure
@internal
def _thread_leaf(state: ThreadState) -> bytes32:
    return keccak256(concat(b"\x00", keccak256(abi_encode(THREAD_STATE_TYPEHASH, state))))


@pure
@internal
def _verify_proof(root: bytes32, leaf: bytes32, proof: DynArray[bytes32, MAX_PROOF]) -> bool:
    node: bytes32 = leaf
    for sibling: bytes32 in proof:
        if convert(node, uint256) < convert(sibling, uint256):
            node = keccak256(concat(b"\x01", node, sibling))
        else:
            node = keccak256(concat(b"\x01", sibling, node))
    return node == root


# --- Internals: signatures -----------------------------------------------------------


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(abi_encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, chain.id, self))


@view
@internal
def _channel_digest(state: ChannelState) -> bytes32:
    return keccak256(
        concat(
            b"\x19\x01",
            self._domain_separator(),
            keccak256(abi_encode(CHANNEL_STATE_TYPEHASH, state)),
        )
    )


@view
@internal
def _thread_digest(state: ThreadState) -> bytes32:
    return keccak256(
        concat(
            b"\x19\x01",
            self._domain_separator(),
            keccak256(abi_encode(THREAD_STATE_TYPEHASH, state)),
        )
    )


@view
@internal
def _check_channel_signatures(state: ChannelState, sigHub: Bytes[65], sigUser: Bytes[65]):
    digest: bytes32 = self._channel_digest(state)
    assert self._signed_by(digest, sigHub, hub), "bad hub signature"
    assert self._signed_by(digest, sigUser, state.user), "bad user signature"


@pure
@internal
def _signed_by(digest: bytes32, sig: Bytes[65], signer: address) -> bool:
    """True if `sig` is a valid signature of `digest` by `signer` (never the zero address)."""
    recovered: address = self._recover(digest, sig)
    return recovered != empty(address) and recovered == signer


@pure
@internal
def _recover(digest: bytes32, sig: Bytes[65]) -> address:
    """The signer of `digest`, or the zero address for a malformed signature."""
    if len(sig) != 65:
        return empty(address)
    r: uint256 = convert(extract32(sig, 0), uint256)
    s: uint256 = convert(extract32(sig, 32), uint256)
    v: uint256 = convert(slice(sig, 64, 1), uint256)
    if v != 27 and v != 28:
        return empty(address)
    if s == 0 or s > HALF_N:
        return empty(address)
    return ecrecover(digest, v, r, s)


# --- Internals: money ------------------------------------------------------------------


@internal
def _to_reserve(amountEth: uint256, amountToken: uint256):
    # Zero amounts skip the (cold) storage access.
    if amountEth > 0:
        self.reserveEth += amountEth
    if amountToken > 0:
        self.reserveToken += amountToken


@internal
def _pay_or_defer(recipient: address, amountEth: uint256, amountToken: uint256):
    """Pay a channel's payout; what the recipient refuses is kept for it to claim.

    A payout never reverts the call that makes it, so a recipient that rejects ETH or a
    token that refuses a transfer cannot hold a channel in its exit.
    """
    deferredEth: uint256 = 0
    deferredToken: uint256 = 0
    if amountEth > 0:
        if not raw_call(
            recipient, b"", value=amountEth, gas=PAYOUT_GAS, revert_on_failure=False
        ):
            deferredEth = amountEth
    if amountToken > 0:
        ok: bool = False
        response: Bytes[32] = b""
        ok, response = raw_call(
            token.address,
            abi_encode(recipient, amountToken, method_id=method_id("transfer(address,uint256)")),
            max_outsize=32,
            revert_on_failure=False,
        )
        if not ok or (len(response) > 0 and not convert(response, bool)):
            deferredToken = amountToken
    if deferredEth > 0 or deferredToken > 0:
        self.unclaimedEth[recipient] += deferredEth
        self.unclaimedToken[recipient] += deferredToken
        log PayoutDeferred(recipient=recipient, amountEth=deferredEth, amountToken=deferredToken)


@internal
def _pay(recipient: address, amountEth: uint256, amountToken: uint256):
    if amountEth > 0:
        send(recipient, amountEth)
    if amountToken > 0:
        assert extcall token.transfer(recipient, amountToken, default_return_value=True), "token transfer failed"


@internal
def _pull_token(owner: address, amount: uint256):
    assert extcall token.transferFrom(
        owner, self, amount, default_return_value=True
    ), "token transferFrom failed"
