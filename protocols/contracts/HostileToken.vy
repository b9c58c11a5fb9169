# pragma version 0.4.3
# @license MIT
"""
@title Hostile token (tests only)
@notice An ERC20 whose transfer and transferFrom call back into a target with a set
        payload before moving funds, to test that the ChannelManager refuses re-entry.
        It records every attempt and whether the call back succeeded.
"""

from ethereum.ercs import IERC20

implements: IERC20

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event ReentryAttempted:
    succeeded: bool

totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
target: public(address)
payload: public(Bytes[4096])
armed: public(bool)
attempts: public(uint256)
successes: public(uint256)


@deploy
def __init__():
    pass


@external
def mint(receiver: address, amount: uint256):
    self.totalSupply += amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=empty(address), receiver=receiver, value=amount)


@external
def arm(target: address, payload: Bytes[4096]):
    """Call `target` with `payload` on every later transfer, until disarmed."""
    self.target = target
    self.payload = payload
    self.armed = True


@external
def disarm():
    self.armed = False


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._reenter()
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(owner: address, receiver: address, amount: uint256) -> bool:
    self._reenter()
    allowed: uint256 = self.allowance[owner][msg.sender]
    assert allowed >= amount, "allowance too low"
    self.allowance[owner][msg.sender] = allowed - amount
    self._transfer(owner, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@internal
def _reenter():
    if not self.armed:
        return
    self.attempts += 1
    ok: bool = raw_call(self.target, self.payload, revert_on_failure=False)
    if ok:
        self.successes += 1
    log ReentryAttempted(succeeded=ok)


@internal
def _transfer(owner: address, receiver: address, amount: uint256):
    assert self.balanceOf[owner] >= amount, "balance too low"
    self.balanceOf[owner] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=owner, receiver=receiver, value=amount)
