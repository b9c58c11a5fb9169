"""Deferred payouts: a recipient that refuses ETH cannot block a payout; it claims later."""

from __future__ import annotations

from typing import Any

from protocols.onchain import record_hash
from protocols.types import Address, Assets
from tests.contracts.harness import ETHER, Deployment, Party


def deploy_rejector(d: Deployment) -> Any:
    return Deployment._deploy(d.w3, d.hub.hex, "Rejector")


def test_withdrawal_to_a_refusing_recipient_is_deferred_then_claimed() -> None:
    d = Deployment.create(n_users=1)
    user = d.users[0]
    rejector = deploy_rejector(d)
    d.user_update(
        d.state(
            user,
            pending_deposit_user=Assets(2 * ETHER, 500),
            tx_count_global=1,
            tx_count_onchain=1,
            timeout=d.now + 100,
        )
    )
    withdrawal = d.state(
        user,
        recipient=Address.from_hex(rejector.address),
        balance_user=Assets(ETHER, 200),
        pending_withdrawal_user=Assets(ETHER, 300),
        tx_count_global=2,
        tx_count_onchain=2,
        timeout=d.now + 100,
    )
    holdings = d.contract_holdings()
    d.hub_update(withdrawal)

    # The ETH was refused and is kept; the token transfer went through.
    deferred = d.logs("PayoutDeferred")
    assert [(e["args"]["amountEth"], e["args"]["amountToken"]) for e in deferred] == [(ETHER, 0)]
    assert d.eth(rejector.address) == 0
    assert d.tokens(rejector.address) == 300
    assert d.manager.functions.unclaimedEth(rejector.address).call() == ETHER
    assert d.contract_holdings() == holdings - Assets(0, 300)
    assert d.manager.functions.channelRecordHash(user.hex).call() == record_hash(d.record(user))

    # The rejector claims its ETH on to an address that accepts it.
    to = Party((0x7777).to_bytes(32, "big"))
    d.send(rejector.functions.claimFrom(d.manager.address, to.hex), d.hub)
    assert d.eth(to) == ETHER
    assert d.manager.functions.unclaimedEth(rejector.address).call() == 0
    claimed = d.logs("PayoutClaimed")
    assert [(e["args"]["amountEth"], e["args"]["amountToken"]) for e in claimed] == [(ETHER, 0)]
    assert d.contract_holdings() == holdings - Assets(ETHER, 300)


def test_claim_refuses_when_nothing_is_owed_or_to_zero() -> None:
    d = Deployment.create(n_users=1)
    with d.reverts("nothing to claim"):
        d.send(d.manager.functions.claim(d.users[0].hex), d.users[0])
    with d.reverts("recipient is the zero address"):
        d.send(d.manager.functions.claim("0x" + "00" * 20), d.users[0])
