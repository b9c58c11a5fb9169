"""The README's embedding example, runnable: `python -m devnet.example`.

A hub and two users on a fresh embedded chain, each a real node in this process: Alice
deposits, opens a thread to Bob, pays him over it directly, closes it and withdraws.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from devnet.deploy import ETHER
from devnet.local import local_network
from protocols.types import Assets


async def main(root: Path) -> None:
    async with local_network(root, users=2) as net:
        alice, bob = net.users
        await alice.deposit(Assets(eth=ETHER, token=10**18))
        await net.hub.collateralize(bob.address, Assets(eth=ETHER // 10))
        key = await alice.open_thread(bob.address, lock=Assets(eth=ETHER // 10))
        for _ in range(10):
            await alice.pay(key, Assets(eth=10**15))
        final = await alice.close_thread(key)
        print(f"thread closed at tx {final.state.tx_count}: Bob got {final.state.balance_receiver}")
        await alice.withdraw(alice.balance().user)
        print(f"Alice withdrew; her channel now holds {alice.balance().user}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(main, Path(tmp))
