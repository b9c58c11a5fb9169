"""The hub's reserve (hubDeposit, hubWithdraw), the constructor and the token-failure paths."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from web3 import Web3

from protocols.eip712 import Domain
from protocols.onchain import GENESIS_RECORD
from protocols.types import Address, Assets
from tests.contracts.conftest import (
    CP,
    ETHER,
    ZERO,
    Money,
    assert_solvent,
    reverts_unchanged,
)
from tests.contracts.harness import Deployment, Reverted, _reason, artifact


def reserve_events(d: Deployment, name: str) -> list[dict[str, Any]]:
    return [dict(e["args"]) for e in d.logs(name)]


# --- success paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eth", "token"), [(3 * ETHER, 700), (ETHER, 0), (0, 10**20)], ids=["both", "eth", "token"]
)
def test_hub_deposit_moves_funds_into_the_reserve(d: Deployment, eth: int, token: int) -> None:
    money = Money(d)
    r = d.hub_deposit(eth, token)
    money.check(
        {d.hub.hex: (-eth, -token), d.manager.address: (eth, token)},
        reserve=(eth, token),
        receipts=[r],
    )
    assert reserve_events(d, "ReserveDeposited") == [
        {"amountEth": eth, "amountToken": token, "reserveEth": eth, "reserveToken": token}
    ]
    assert_solvent(d)


def test_hub_deposits_accumulate(d: Deployment) -> None:
    d.hub_deposit(ETHER, 5)
    d.hub_deposit(2 * ETHER, 7)
    assert d.reserve().eth == 3 * ETHER and d.reserve().token == 12
    assert reserve_events(d, "ReserveDeposited") == [
        {"amountEth": 2 * ETHER, "amountToken": 7, "reserveEth": 3 * ETHER, "reserveToken": 12}
    ]


@pytest.mark.parametrize(
    ("eth", "token"), [(ETHER, 300), (2 * ETHER, 0), (0, 1000)], ids=["both", "eth", "token"]
)
def test_hub_withdraw_pays_the_recipient(d: Deployment, eth: int, token: int) -> None:
    d.hub_deposit(2 * ETHER, 1000)
    recipient = d.users[1]
    money = Money(d)
    r = d.hub_withdraw(recipient, eth, token)
    money.check(
        {recipient.hex: (eth, token), d.manager.address: (-eth, -token)},
        reserve=(-eth, -token),
        receipts=[r],
    )
    assert reserve_events(d, "ReserveWithdrawn") == [
        {
            "recipient": recipient.hex,
            "amountEth": eth,
            "amountToken": token,
            "reserveEth": 2 * ETHER - eth,
            "reserveToken": 1000 - token,
        }
    ]
    assert_solvent(d)


def test_hub_withdraw_can_empty_the_reserve_to_itself(d: Deployment) -> None:
    d.hub_deposit(ETHER, 9)
    money = Money(d)
    r = d.hub_withdraw(d.hub, ETHER, 9)
    money.check({d.hub.hex: (ETHER, 9), d.manager.address: (-ETHER, -9)}, (-ETHER, -9), [r])
    assert d.reserve().is_zero()


def test_views_of_the_deployment(d: Deployment) -> None:
    f = d.manager.functions
    assert f.hub().call() == d.hub.hex
    assert f.token().call() == d.token.address
    assert f.challengePeriod().call() == CP


# --- reverts ----------------------------------------------------------------------------------


def test_only_the_hub_deposits(d: Deployment) -> None:
    for caller in (d.users[0], d.outsider):
        with reverts_unchanged(d, "caller is not the hub"):
            d.send(d.manager.functions.hubDeposit(5), caller, value=ETHER)


def test_deposit_of_nothing_reverts(d: Deployment) -> None:
    with reverts_unchanged(d, "nothing to deposit"):
        d.hub_deposit(0, 0)


def test_only_the_hub_withdraws(d: Deployment) -> None:
    d.hub_deposit(ETHER, 10)
    for caller in (d.users[0], d.outsider):
        with reverts_unchanged(d, "caller is not the hub"):
            d.hub_withdraw(caller, 1, 1, sender=caller)


def test_withdraw_to_the_zero_address_reverts(d: Deployment) -> None:
    d.hub_deposit(ETHER, 10)
    with reverts_unchanged(d, "recipient is the zero address"):
        d.send(d.manager.functions.hubWithdraw(ZERO, 1, 1), d.hub)


def test_withdraw_of_nothing_reverts(d: Deployment) -> None:
    d.hub_deposit(ETHER, 10)
    with reverts_unchanged(d, "nothing to withdraw"):
        d.hub_withdraw(d.hub, 0, 0)


def test_withdraw_beyond_the_reserve_reverts(d: Deployment) -> None:
    d.hub_deposit(ETHER, 10)
    with reverts_unchanged(d, "reserve too low (eth)"):
        d.hub_withdraw(d.hub, ETHER + 1, 0)
    with reverts_unchanged(d, "reserve too low (token)"):
        d.hub_withdraw(d.hub, 0, 11)
    with reverts_unchanged(d, "reserve too low (token)"):
        d.hub_withdraw(d.hub, ETHER, 11)


def test_withdraw_cannot_take_channel_funds(d: Deployment) -> None:
    """Funds held for a channel are not in the reserve: the hub cannot withdraw them."""
    user = d.users[0]
    d.hub_deposit(ETHER, 10)
    d.user_update(
        d.state(
            user,
            pending_deposit_user=Assets(5 * ETHER, 50),
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=d.now + 100,
        )
    )
    assert d.contract_holdings().eth == 6 * ETHER
    with reverts_unchanged(d, "reserve too low (eth)"):
        d.hub_withdraw(d.hub, 2 * ETHER, 0)
    with reverts_unchanged(d, "reserve too low (token)"):
        d.hub_withdraw(d.hub, 0, 11)


# --- constructor ------------------------------------------------------------------------------


def deploy_reason(d: Deployment, *args: Any) -> str:
    art = artifact("ChannelManager")
    factory = d.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    try:
        tx = factory.constructor(*args).transact({"from": d.hub.hex})
    except Exception as exc:
        return _reason(exc)
    receipt = d.w3.eth.wait_for_transaction_receipt(tx)
    raise AssertionError(f"deployment succeeded: {receipt['contractAddress']}")


def test_constructor_checks_its_arguments(d: Deployment) -> None:
    token = d.token.address
    assert deploy_reason(d, ZERO, token, CP) == "hub is the zero address"
    assert deploy_reason(d, d.hub.hex, d.users[0].hex, CP) == "token is not a contract"
    assert deploy_reason(d, d.hub.hex, token, 0) == "challenge period is zero"


# --- tokens that refuse -------------------------------------------------------------------------

# Runtime code of a stub "token": every call returns 32 bytes; the word is 1 (true) for
# transferFrom(address,address,uint256) (selector 0x23b872dd) and 0 (false) for anything else.
#   PUSH1 0 CALLDATALOAD PUSH1 0xe0 SHR PUSH4 0x23b872dd EQ PUSH1 0 MSTORE PUSH1 32 PUSH1 0 RETURN
PULL_ONLY_RUNTIME = bytes.fromhex("60003560e01c6323b872dd1460005260206000f3")
# Runtime code that returns 32 zero bytes (false) for every call.
#   PUSH1 32 PUSH1 0 RETURN
ALWAYS_FALSE_RUNTIME = bytes.fromhex("60206000f3")


def deploy_stub(d: Deployment, runtime: bytes) -> str:
    """Deploy `runtime` as is: init code CODECOPY + RETURN of the runtime."""
    n = len(runtime)
    assert n < 256
    # PUSH1 n PUSH1 12 PUSH1 0 CODECOPY PUSH1 n PUSH1 0 RETURN  (12 bytes), then the runtime
    init = bytes([0x60, n, 0x60, 12, 0x60, 0, 0x39, 0x60, n, 0x60, 0, 0xF3]) + runtime
    tx = d.w3.eth.send_transaction({"from": d.hub.hex, "data": init})
    address = d.w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
    assert address is not None
    assert bytes(d.w3.eth.get_code(address)) == runtime
    return str(address)


def deploy_manager_on(d: Deployment, token: str) -> Any:
    return Deployment._deploy(d.w3, d.hub.hex, "ChannelManager", d.hub.hex, token, CP)


def test_token_that_refuses_transfer_from_fails_the_deposit(d: Deployment) -> None:
    manager = deploy_manager_on(d, deploy_stub(d, ALWAYS_FALSE_RUNTIME))
    before = (d.eth(d.hub), d.eth(manager.address))
    with pytest.raises(Reverted) as info:
        d.send(manager.functions.hubDeposit(5), d.hub, value=ETHER)
    assert str(info.value) == "token transferFrom failed"
    assert (d.eth(d.hub), d.eth(manager.address)) == before
    assert manager.functions.reserveToken().call() == 0


def test_token_that_refuses_transfer_fails_the_withdrawal(d: Deployment) -> None:
    manager = deploy_manager_on(d, deploy_stub(d, PULL_ONLY_RUNTIME))
    d.send(manager.functions.hubDeposit(5), d.hub, value=ETHER)
    assert manager.functions.reserveToken().call() == 5
    with pytest.raises(Reverted) as info:
        d.send(manager.functions.hubWithdraw(d.users[0].hex, ETHER, 5), d.hub)
    assert str(info.value) == "token transfer failed"
    assert manager.functions.reserveToken().call() == 5
    assert manager.functions.reserveEth().call() == ETHER
    assert d.eth(manager.address) == ETHER


# --- deferred payouts and claim ---------------------------------------------------------------


def test_claim_needs_something_owed_and_a_recipient(d: Deployment) -> None:
    with reverts_unchanged(d, "nothing to claim"):
        d.send(d.manager.functions.claim(d.users[0].hex), d.users[0])
    with reverts_unchanged(d, "recipient is the zero address"):
        d.send(d.manager.functions.claim(ZERO), d.users[0])


def test_token_that_refuses_a_payout_does_not_block_the_exit(d: Deployment) -> None:
    """emptyChannel pays the ETH, keeps the refused tokens for the user to claim, and
    reopens the channel; a claim fails for as long as the token refuses."""
    stub = deploy_stub(d, PULL_ONLY_RUNTIME)
    manager = deploy_manager_on(d, stub)
    abi = artifact("TestToken")["abi"]
    m = replace(
        d,
        manager=manager,
        token=d.w3.eth.contract(address=Web3.to_checksum_address(stub), abi=abi),
        domain=Domain(d.domain.chain_id, Address.from_hex(manager.address)),
        records={},
        disputes={},
    )
    user = m.users[0]
    m.user_update(
        m.state(
            user,
            pending_deposit_user=Assets(ETHER, 100),
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=m.now + 100,
        )
    )
    m.start_exit(user)
    m.travel(CP)
    before = m.eth(user)
    r = m.empty_channel(user)
    assert m.eth(user) == before + ETHER
    assert m.eth(manager.address) == 0
    assert [dict(e["args"]) for e in m.logs("PayoutDeferred", r)] == [
        {"recipient": user.hex, "amountEth": 0, "amountToken": 100}
    ]
    f = manager.functions
    assert (f.unclaimedEth(user.hex).call(), f.unclaimedToken(user.hex).call()) == (0, 100)
    assert m.record(user) == replace(GENESIS_RECORD, tx_count_global=1, tx_count_onchain=1)
    with pytest.raises(Reverted) as info:
        m.send(f.claim(user.hex), user)
    assert str(info.value) == "token transfer failed"
    assert f.unclaimedToken(user.hex).call() == 100
