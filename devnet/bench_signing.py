"""Benchmark: our coincurve signing path against eth_account's typed-data calls.

    python -m devnet.bench_signing [--runs 5] [--n 2000] [--json]

Each run times every operation over `n` thread states (a pool of distinct states, reused
cyclically); the report gives the median over runs in microseconds per operation and the
ratio eth_account / fast. eth_account is handed ready-made typed-data dicts, so the ratio
does not count building them. Before timing, one signature is checked byte-identical.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

from protocols.eip712 import DOMAIN_TYPE, THREAD_STATE_TYPE, Domain, thread_state_digest
from protocols.signing import Signer, recover_thread_state
from protocols.types import Address, Assets, Signature, ThreadState

POOL_SIZE = 64
PRIVATE_KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
DOMAIN = Domain(chain_id=31337, verifying_contract=Address(b"\xc0" * 20))

OPS = ("digest", "fast_sign", "fast_recover", "eth_account_sign", "eth_account_recover")
RATIOS = {
    "sign": ("eth_account_sign", "fast_sign"),
    "recover": ("eth_account_recover", "fast_recover"),
}


def _fields(type_string: str) -> tuple[str, list[dict[str, str]]]:
    name, _, rest = type_string.partition("(")
    members = (member.split(" ") for member in rest.rstrip(")").split(","))
    return name, [{"name": field_name, "type": field_type} for field_type, field_name in members]


def _typed_data(domain: Domain, state: ThreadState) -> dict[str, Any]:
    primary, fields = _fields(THREAD_STATE_TYPE)
    _, domain_fields = _fields(DOMAIN_TYPE)
    return {
        "types": {"EIP712Domain": domain_fields, primary: fields},
        "primaryType": primary,
        "domain": {
            "name": domain.name,
            "version": domain.version,
            "chainId": domain.chain_id,
            "verifyingContract": domain.verifying_contract.checksum(),
        },
        "message": {
            "threadId": state.thread_id,
            "sender": state.sender.checksum(),
            "receiver": state.receiver.checksum(),
            "balanceEthSender": state.balance_sender.eth,
            "balanceEthReceiver": state.balance_receiver.eth,
            "balanceTokenSender": state.balance_sender.token,
            "balanceTokenReceiver": state.balance_receiver.token,
            "txCount": state.tx_count,
        },
    }


def _pool() -> list[ThreadState]:
    sender, receiver = Address(b"\xaa" * 20), Address(b"\xbb" * 20)
    return [
        ThreadState(
            thread_id=i,
            sender=sender,
            receiver=receiver,
            balance_sender=Assets(10**18 - i * 10**15, 5 * 10**6),
            balance_receiver=Assets(i * 10**15, 0),
            tx_count=i,
        )
        for i in range(POOL_SIZE)
    ]


def _time_per_op(op: Callable[[int], object], n: int) -> float:
    """Microseconds per call of `op(i)` for i in range(n), garbage collector paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for i in range(n):
            op(i)
        elapsed = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / n / 1000


def run(runs: int, n: int) -> dict[str, Any]:
    """Time every operation `runs` times over `n` calls; return the report as a dict."""
    signer = Signer(PRIVATE_KEY)
    states = _pool()
    messages = [_typed_data(DOMAIN, state) for state in states]
    signatures = [signer.sign_thread_state(DOMAIN, state) for state in states]
    raw_signatures = [signature.raw for signature in signatures]

    reference = Account.sign_typed_data(PRIVATE_KEY, full_message=messages[0])
    if bytes(reference.signature) != signatures[0].raw:
        raise SystemExit("fast signature differs from eth_account's: refusing to benchmark")

    def digest(i: int) -> bytes:
        return thread_state_digest(DOMAIN, states[i % POOL_SIZE])

    def fast_sign(i: int) -> Signature:
        return signer.sign_thread_state(DOMAIN, states[i % POOL_SIZE])

    def fast_recover(i: int) -> Address:
        k = i % POOL_SIZE
        return recover_thread_state(DOMAIN, states[k], signatures[k])

    def eth_account_sign(i: int) -> object:
        return Account.sign_typed_data(PRIVATE_KEY, full_message=messages[i % POOL_SIZE])

    def eth_account_recover(i: int) -> str:
        k = i % POOL_SIZE
        signable = encode_typed_data(full_message=messages[k])
        return str(Account.recover_message(signable, signature=raw_signatures[k]))

    ops: dict[str, Callable[[int], object]] = {
        "digest": digest,
        "fast_sign": fast_sign,
        "fast_recover": fast_recover,
        "eth_account_sign": eth_account_sign,
        "eth_account_recover": eth_account_recover,
    }
    for op in ops.values():  # warm up caches and lazy imports
        _time_per_op(op, min(n, 50))
    samples: dict[str, list[float]] = {name: [] for name in OPS}
    for _ in range(runs):
        for name in OPS:
            samples[name].append(_time_per_op(ops[name], n))

    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "runs": runs,
        "n": n,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "us_per_op": {name: round(value, 2) for name, value in median.items()},
        "us_per_op_min": {name: round(min(values), 2) for name, values in samples.items()},
        "us_per_op_max": {name: round(max(values), 2) for name, values in samples.items()},
        "ratio_eth_account_over_fast": {
            what: round(median[slow] / median[fast], 1) for what, (slow, fast) in RATIOS.items()
        },
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"signing benchmark: {report['runs']} runs x {report['n']} ops, "
        f"nproc {report['nproc']}, Python {report['python']} ({report['machine']})",
        "",
        f"{'operation':<22}{'median µs/op':>14}{'min':>10}{'max':>10}",
    ]
    for name in OPS:
        lines.append(
            f"{name:<22}{report['us_per_op'][name]:>14.2f}"
            f"{report['us_per_op_min'][name]:>10.2f}{report['us_per_op_max'][name]:>10.2f}"
        )
    lines.append("")
    for what, ratio in report["ratio_eth_account_over_fast"].items():
        lines.append(f"eth_account / fast, {what}: {ratio:.1f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per operation")
    parser.add_argument("--n", type=int, default=2000, help="calls per run")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.n < 1:
        parser.error("--runs and --n must be at least 1")
    report = run(args.runs, args.n)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
