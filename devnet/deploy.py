"""A fresh Weft deployment on a development chain: the contracts, and funded accounts.

`deploy_contracts` is what both devnets start from: the in-process network of
`devnet.local` and the OS processes of `devnet.processes`.
"""

from __future__ import annotations

from collections.abc import Iterable

from node.chain import ChainService, ManagerClient, TokenClient
from protocols.signing import Signer

__all__ = ["CHALLENGE_PERIOD", "ETHER", "TOKENS", "deploy_contracts"]

ETHER = 10**18
"""Wei in one ether."""
TOKENS = 10**24
"""Test tokens (base units) minted to every account."""
CHALLENGE_PERIOD = 100
"""The ChannelManager's challenge period, in blocks."""
HUB_ETHER = 1000 * ETHER
USER_ETHER = 100 * ETHER


async def deploy_contracts(
    chain: ChainService, hub_key: bytes, user_keys: Iterable[bytes]
) -> tuple[TokenClient, ManagerClient]:
    """Deploy a TestToken and a ChannelManager (with `CHALLENGE_PERIOD`) for the hub of
    `hub_key`, which sends the deployments and mints; fund the hub with `HUB_ETHER` and
    each user with `USER_ETHER` (from the chain's prefunded account), and mint `TOKENS` to
    each of them.

    Returns `(token, manager)`. Raises what `ChainService` raises (`ChainError`s; funding
    needs a development chain). Cancelling it leaves a partial deployment on the chain.
    """
    hub = Signer(hub_key).address
    await chain.fund(hub, HUB_ETHER)
    token = await chain.deploy_token("Weft Test Token", "WTT", sender_key=hub_key)
    manager = await chain.deploy_channel_manager(
        hub, token.address, CHALLENGE_PERIOD, sender_key=hub_key
    )
    await token.mint(hub, TOKENS, sender_key=hub_key)
    for key in user_keys:
        user = Signer(key).address
        await chain.fund(user, USER_ETHER)
        await token.mint(user, TOKENS, sender_key=hub_key)
    return token, manager
