# pragma version 0.4.3
# @license MIT
"""
@title Rejector (tests only)
@notice A recipient that refuses ETH, to test that ChannelManager defers refused payouts;
        it can claim them on to another address.
"""

interface Claimable:
    def claim(to: address): nonpayable


@deploy
def __init__():
    pass


@payable
@external
def __default__():
    raise "Rejector refuses ETH"


@external
def claimFrom(manager: address, to: address):
    extcall Claimable(manager).claim(to)
