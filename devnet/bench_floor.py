"""The floor under the node benchmark: the same thread payments over raw trio TCP.

    python -m devnet.bench_floor [--sequential 1000] [--pipelined 10000] [--window 256]
                                 [--warmup 200] [--json]

Two OS processes on 127.0.0.1, a payer and a payee, joined by one plain `trio` TCP stream
(TCP_NODELAY) carrying length-prefixed frames (`protocols.wire.frame`). Per payment the
payer builds the next `ThreadState` (the amount moves from its balance to the payee's,
tx_count + 1), signs its EIP-712 digest with the node's `Signer`, encodes a `ThreadProposal`
with the node's wire codec and sends it; the payee decodes it, checks it
(`check_proposal`: the thread, the signature recovers to the sender, the successor
tx_count, the total conserved, value moving from the payer only), countersigns and answers
a `ThreadCountersign` (or a `ThreadReject` saying why); the payer checks that the
countersignature recovers to the payee. That is the node's per-payment signing,
verification and encoding, minus libp2p (noise, yamux), storage and the protocol machines.

After `--warmup` sequential payments (not timed):

- sequential: one payment in flight, one proposal per write; each latency from building
  the state to the checked countersignature;
- pipelined: up to `--window` payments in flight. The payer writes all the proposals it
  has credit for in one write, and the payee answers each batch it read in one write, so
  part of the rate comes from this batching. A latency runs from the moment the payment is
  started (it got its credit, i.e. entered the window, and its state is built) to its
  checked countersignature: it includes the building of the rest of its batch and the
  queueing behind the other payments in flight, not the wait for a credit.

The payer prints its results as one JSON object (`--role payer`); `run_floor` starts both
processes and returns that object. The keys are throwaway constants, never funded. The
floor's own processes import only trio and `protocols/` (`run_floor`, in the parent, uses
`devnet.processes`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import trio

from protocols.eip712 import Domain, thread_state_digest
from protocols.errors import DecodeError
from protocols.keccak import keccak
from protocols.messages import RejectReason, ThreadCountersign, ThreadProposal, ThreadReject
from protocols.signing import Signer, is_signed_by
from protocols.types import Address, Assets, ThreadState
from protocols.wire import FrameReader, decode_thread, encode, frame

PAYER_KEY: Final = keccak(b"weft bench floor: payer")
PAYEE_KEY: Final = keccak(b"weft bench floor: payee")
DOMAIN: Final = Domain(chain_id=31337, verifying_contract=Address(b"\xc0" * 20))
THREAD_ID: Final = 1
LOCK: Final = Assets(10 * 10**18, 10**20)
"""The payer's initial balance in the floor's thread."""
AMOUNT: Final = Assets(1_000_000, 1)
"""What each payment moves (the node benchmark pays the same)."""

RECEIVE_SIZE: Final = 65_536
DEFAULT_TIME_LIMIT: Final = 300.0
"""Seconds each timed phase (and the payer's connection) may take before the run fails."""
MAX_COUNT: Final = 1_000_000
MAX_WINDOW: Final = 1024


class FloorError(Exception):
    """The floor run failed: the peer refused, misbehaved, closed the connection, or a
    process did not finish."""


class ProposalRefused(Exception):
    """A proposal the payee refuses, with the reason it answers."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.name}: {detail}")
        self.reason = reason
        self.detail = detail


def initial_state() -> ThreadState:
    """The floor's thread at tx_count 0: `LOCK` of the payer's, nothing of the payee's."""
    return ThreadState(
        thread_id=THREAD_ID,
        sender=Signer(PAYER_KEY).address,
        receiver=Signer(PAYEE_KEY).address,
        balance_sender=LOCK,
        balance_receiver=Assets(),
        tx_count=0,
    )


def check_proposal(domain: Domain, latest: ThreadState, proposal: ThreadProposal) -> bytes:
    """The digest of `proposal.state` if it is a valid payment after `latest`.

    Valid: the same thread, signed by its sender, tx_count and prev_tx_count right after
    `latest`, the same total, a non-empty amount moving from the sender to the receiver.
    Raises `ProposalRefused` with the reason otherwise.
    """
    state = proposal.state
    if state.key != latest.key:
        raise ProposalRefused(RejectReason.UNKNOWN_THREAD, "not this thread")
    digest = thread_state_digest(domain, state)
    if not is_signed_by(digest, proposal.signature, state.sender):
        raise ProposalRefused(RejectReason.BAD_SIGNATURE, "not signed by the sender")
    if proposal.prev_tx_count != latest.tx_count or state.tx_count != latest.tx_count + 1:
        raise ProposalRefused(
            RejectReason.NOT_SUCCESSOR, f"tx_count {state.tx_count} after {latest.tx_count}"
        )
    if state.total() != latest.total():
        raise ProposalRefused(RejectReason.BALANCE_NOT_CONSERVED, "the total changed")
    if not latest.balance_sender.covers(state.balance_sender) or not (
        state.balance_receiver.covers(latest.balance_receiver)
    ):
        raise ProposalRefused(RejectReason.INVALID_TRANSITION, "value must move to the payee")
    if state.balance_receiver == latest.balance_receiver:
        raise ProposalRefused(RejectReason.EMPTY_PAYMENT, "payment of nothing")
    return digest


class FloorPayer:
    """The payer's side, no I/O: builds, signs and encodes proposals; checks the answers."""

    __slots__ = ("_domain", "_in_flight", "_latest", "_signer")

    def __init__(self, signer: Signer, domain: Domain, initial: ThreadState) -> None:
        self._signer = signer
        self._domain = domain
        self._latest = initial  # the latest state proposed
        self._in_flight: dict[int, ThreadState] = {}  # by tx_count, awaiting countersigns

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def propose(self, amount: Assets) -> tuple[int, bytes]:
        """Pay `amount` on top of the latest proposal: (its tx_count, the encoded proposal).

        Raises `FloorError` if the balance does not cover `amount`.
        """
        prev = self._latest
        if not prev.balance_sender.covers(amount):
            raise FloorError(f"the payer's balance {prev.balance_sender} does not cover {amount}")
        state = ThreadState(
            thread_id=prev.thread_id,
            sender=prev.sender,
            receiver=prev.receiver,
            balance_sender=prev.balance_sender - amount,
            balance_receiver=prev.balance_receiver + amount,
            tx_count=prev.tx_count + 1,
        )
        signature = self._signer.sign_thread_state(self._domain, state)
        self._in_flight[state.tx_count] = state
        self._latest = state
        return state.tx_count, encode(ThreadProposal(state, prev.tx_count, signature))

    def receive(self, data: bytes) -> int:
        """Check one answer of the payee; return the tx_count it countersigned.

        Raises `FloorError` for a rejection, an undecodable message, a countersignature of
        no proposal in flight or one that does not recover to the payee.
        """
        try:
            message = decode_thread(data)
        except DecodeError as exc:
            raise FloorError(f"undecodable answer: {exc}") from None
        if isinstance(message, ThreadReject):
            raise FloorError(
                f"the payee refused tx_count {message.tx_count}: "
                f"{message.reason.name}: {message.detail}"
            )
        if not isinstance(message, ThreadCountersign) or message.key != self._latest.key:
            raise FloorError(f"unexpected answer: {type(message).__name__}")
        state = self._in_flight.pop(message.tx_count, None)
        if state is None:
            raise FloorError(f"countersign of tx_count {message.tx_count}, not in flight")
        digest = thread_state_digest(self._domain, state)
        if not is_signed_by(digest, message.signature, state.receiver):
            raise FloorError(f"countersign of tx_count {message.tx_count} not by the payee")
        return message.tx_count


class FloorPayee:
    """The payee's side, no I/O: checks proposals and answers them."""

    __slots__ = ("_domain", "_latest", "_signer", "countersigned")

    def __init__(self, signer: Signer, domain: Domain, initial: ThreadState) -> None:
        self._signer = signer
        self._domain = domain
        self._latest = initial  # the latest state countersigned
        self.countersigned = 0

    @property
    def latest(self) -> ThreadState:
        return self._latest

    def receive(self, data: bytes) -> bytes:
        """The encoded answer to one message: a `ThreadCountersign` of a valid proposal, or
        a `ThreadReject` with the reason (the latest countersigned state stays)."""
        latest = self._latest
        try:
            message = decode_thread(data)
        except DecodeError as exc:
            return self._reject(latest.tx_count, RejectReason.POLICY, f"undecodable: {exc}")
        if not isinstance(message, ThreadProposal):
            return self._reject(
                latest.tx_count, RejectReason.POLICY, f"unexpected {type(message).__name__}"
            )
        try:
            digest = check_proposal(self._domain, latest, message)
        except ProposalRefused as refused:
            return self._reject(message.state.tx_count, refused.reason, refused.detail)
        signature = self._signer.sign_digest(digest)
        self._latest = message.state
        self.countersigned += 1
        return encode(ThreadCountersign(latest.key, message.state.tx_count, signature))

    def _reject(self, tx_count: int, reason: RejectReason, detail: str) -> bytes:
        latest = self._latest
        return encode(ThreadReject(latest.key, tx_count, reason, latest.tx_count, detail[:200]))


# ---------------------------------------------------------------- I/O


class FrameLink:
    """Frames over one trio stream."""

    __slots__ = ("_reader", "_stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._reader = FrameReader()

    async def send(self, payloads: Sequence[bytes]) -> None:
        """Send `payloads` framed, in one write."""
        await self._stream.send_all(b"".join(frame(p) for p in payloads))

    async def receive(self) -> list[bytes]:
        """The next payloads (at least one), or [] once the peer closed the stream.

        Raises `FloorError` if the framing breaks or the stream ends inside a frame.
        """
        while True:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                if self._reader.buffered:
                    raise FloorError("the stream ended inside a frame")
                return []
            try:
                payloads = self._reader.feed(data)
            except DecodeError as exc:
                raise FloorError(f"framing broken: {exc}") from None
            if payloads:
                return payloads


async def answer_payments(link: FrameLink, payee: FloorPayee) -> int:
    """Answer every message on `link` until the payer closes it; return how many."""
    answered = 0
    while True:
        payloads = await link.receive()
        if not payloads:
            return answered
        await link.send([payee.receive(p) for p in payloads])
        answered += len(payloads)


async def _next_answers(link: FrameLink) -> list[bytes]:
    payloads = await link.receive()
    if not payloads:
        raise FloorError("the payee closed the connection")
    return payloads


async def pay_sequential(
    link: FrameLink, payer: FloorPayer, amount: Assets, count: int
) -> list[float]:
    """Make `count` payments one at a time; return each one's latency in seconds."""
    latencies = []
    for _ in range(count):
        begun = time.perf_counter()
        tx_count, proposal = payer.propose(amount)
        await link.send([proposal])
        answers = await _next_answers(link)
        if len(answers) != 1 or payer.receive(answers[0]) != tx_count:
            raise FloorError(f"expected one countersign of tx_count {tx_count}")
        latencies.append(time.perf_counter() - begun)
    return latencies


async def pay_pipelined(
    link: FrameLink, payer: FloorPayer, amount: Assets, count: int, window: int
) -> list[float]:
    """Make `count` payments with up to `window` in flight; return each one's latency in
    seconds, from its proposal to its checked countersign, in the order they completed."""
    credits = trio.Semaphore(window)
    begun: dict[int, float] = {}
    latencies: list[float] = []

    async def propose_all() -> None:
        proposed = 0
        while proposed < count:
            await credits.acquire()
            take = 1
            while proposed + take < count:
                try:
                    credits.acquire_nowait()
                except trio.WouldBlock:
                    break
                take += 1
            batch = []
            for _ in range(take):
                started = time.perf_counter()
                tx_count, proposal = payer.propose(amount)
                begun[tx_count] = started
                batch.append(proposal)
            await link.send(batch)
            proposed += take

    async with trio.open_nursery() as nursery:
        nursery.start_soon(propose_all)
        while len(latencies) < count:
            for answer in await _next_answers(link):
                tx_count = payer.receive(answer)
                latencies.append(time.perf_counter() - begun.pop(tx_count))
                credits.release()
    return latencies


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 for an empty one); the same rule
    as the node's `bench_pay` (`node.control`, which the floor's processes do not load; a
    test keeps the two equal). `devnet.bench_node` uses it too."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(latencies: list[float], seconds: float) -> dict[str, Any]:
    """count, seconds, payments_per_s and latencies_ms {p50, p90, p99}, as `bench_pay`."""
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "seconds": seconds,
        "payments_per_s": len(ordered) / seconds if seconds > 0 else None,
        "latencies_ms": {
            name: 1000 * percentile(ordered, q)
            for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
        },
    }


async def run_payer(
    port: int, sequential: int, pipelined: int, window: int, warmup: int, time_limit: float
) -> dict[str, Any]:
    """Connect to the payee on 127.0.0.1:`port` and make the payments; the results.

    The connection and each phase must end within `time_limit` seconds (else
    `trio.TooSlowError`).
    """
    payer = FloorPayer(Signer(PAYER_KEY), DOMAIN, initial_state())
    with trio.fail_after(time_limit):  # the payee listens already: it printed the port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        link = FrameLink(stream)
        with trio.fail_after(time_limit):
            await pay_sequential(link, payer, AMOUNT, warmup)
        results: dict[str, Any] = {"warmup": warmup, "window": window}
        for mode, count in (("sequential", sequential), ("pipelined", pipelined)):
            cpu = time.process_time()
            started = time.perf_counter()
            with trio.fail_after(time_limit):
                if mode == "sequential":
                    latencies = await pay_sequential(link, payer, AMOUNT, count)
                else:
                    latencies = await pay_pipelined(link, payer, AMOUNT, count, window)
            results[mode] = summary(latencies, time.perf_counter() - started)
            results[mode]["payer_cpu_s"] = time.process_time() - cpu
        if payer.in_flight:
            raise FloorError(f"{payer.in_flight} payments still in flight at the end")
    return results


async def serve_payee(time_limit: float) -> int:
    """Listen on 127.0.0.1 (port printed on stdout), answer one payer until it closes the
    connection, then return how many messages were answered; `trio.TooSlowError` if that
    takes longer than `time_limit` seconds."""
    payee = FloorPayee(Signer(PAYEE_KEY), DOMAIN, initial_state())
    with trio.fail_after(time_limit):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        async with listeners[0]:
            stream = await listeners[0].accept()
        async with stream:
            return await answer_payments(FrameLink(stream), payee)


def run_floor(
    sequential: int,
    pipelined: int,
    window: int,
    warmup: int = 200,
    time_limit: float = DEFAULT_TIME_LIMIT,
) -> dict[str, Any]:
    """Run the floor in two fresh processes (payee, payer); return the payer's results:
    `{"sequential": summary, "pipelined": summary, "warmup", "window"}` where each summary
    is `{count, seconds, payments_per_s, latencies_ms: {p50, p90, p99}, payer_cpu_s}`.

    Raises `FloorError` if a process fails or does not finish in time. Both processes are
    stopped (by their pids) before it returns.
    """
    # Imported here so that the floor's own processes load only trio and protocols/.
    from devnet.processes import REPO_ROOT, STARTUP_GUARD, read_line, stop_process

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    limit = str(time_limit)
    command = [sys.executable, "-m", "devnet.bench_floor", "--time-limit", limit]
    payee = subprocess.Popen(
        [*command, "--role", "payee"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert payee.stdout is not None and payee.stderr is not None
    try:
        try:
            port = int(read_line(payee.stdout, STARTUP_GUARD))
        except (TimeoutError, ValueError) as exc:
            raise FloorError(f"the floor's payee did not start: {exc}") from None
        arguments = ["--port", str(port), "--sequential", str(sequential)]
        arguments += ["--pipelined", str(pipelined), "--window", str(window)]
        try:
            payer = subprocess.run(
                [*command, "--role", "payer", "--warmup", str(warmup), *arguments],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=STARTUP_GUARD + 4 * time_limit,  # the connection and three phases
            )
        except subprocess.TimeoutExpired:
            raise FloorError("the floor's payer did not finish in time") from None
        if payer.returncode != 0:
            tail = "\n".join(payer.stderr.splitlines()[-10:])
            raise FloorError(f"the floor's payer exited with {payer.returncode}:\n{tail}")
        try:
            result: dict[str, Any] = json.loads(payer.stdout)
        except ValueError:
            raise FloorError(f"the floor's payer printed no JSON: {payer.stdout[:200]!r}") from None
        return result
    finally:
        stop_process(payee)
        payee.stdout.close()
        payee.stderr.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devnet.bench_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sequential", type=int, default=1000, help="sequential payments")
    parser.add_argument("--pipelined", type=int, default=10_000, help="pipelined payments")
    parser.add_argument("--window", type=int, default=256, help="payments in flight")
    parser.add_argument("--warmup", type=int, default=200, help="untimed payments first")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--role", choices=("payer", "payee"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--time-limit", type=float, default=DEFAULT_TIME_LIMIT, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if not 1 <= args.sequential <= MAX_COUNT or not 1 <= args.pipelined <= MAX_COUNT:
        parser.error(f"--sequential and --pipelined in 1..{MAX_COUNT}")
    if not 1 <= args.window <= MAX_WINDOW or not 0 <= args.warmup <= MAX_COUNT:
        parser.error(f"--window in 1..{MAX_WINDOW}, --warmup in 0..{MAX_COUNT}")
    if not 0 < args.time_limit <= 3600:
        parser.error("--time-limit in (0, 3600]")
    if args.role == "payee":
        trio.run(serve_payee, args.time_limit)
        return 0
    if args.role == "payer":
        if args.port is None:
            parser.error("--role payer needs --port")
        result = trio.run(
            run_payer,
            args.port,
            args.sequential,
            args.pipelined,
            args.window,
            args.warmup,
            args.time_limit,
        )
        print(json.dumps(result))
        return 0
    try:
        result = run_floor(
            args.sequential, args.pipelined, args.window, args.warmup, args.time_limit
        )
    except FloorError as exc:
        print(f"bench_floor: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for mode in ("sequential", "pipelined"):
        r = result[mode]
        print(
            f"{mode:<11} {r['payments_per_s']:>10,.0f} payments/s, p50 "
            f"{r['latencies_ms']['p50']:.3f} ms, p99 {r['latencies_ms']['p99']:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
