"""`weft bench` (devnet.bench_node) and its floor (devnet.bench_floor).

The floor must really check what it claims to check (the signatures, the successor, the
conserved total), or its rate would be no floor at all; the benchmark must report every
documented figure, and refuse bad arguments with a usage message.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import trio
import trio.testing

from devnet import bench_floor as fl
from devnet import bench_node
from node.cli import main as weft_main
from protocols.keccak import keccak
from protocols.messages import RejectReason, ThreadProposal
from protocols.signing import Signer
from protocols.types import Assets
from protocols.wire import decode_thread

WRONG_KEY = keccak(b"not the payer")


def payer(key: bytes = fl.PAYER_KEY) -> fl.FloorPayer:
    return fl.FloorPayer(Signer(key), fl.DOMAIN, fl.initial_state())


def payee(key: bytes = fl.PAYEE_KEY) -> fl.FloorPayee:
    return fl.FloorPayee(Signer(key), fl.DOMAIN, fl.initial_state())


def proposal(data: bytes) -> ThreadProposal:
    message = decode_thread(data)
    assert isinstance(message, ThreadProposal)
    return message


# ---------------------------------------------------------------- the floor, no I/O


def test_a_payment_is_countersigned_and_checked() -> None:
    a, b = payer(), payee()
    for expected in (1, 2, 3):
        tx_count, data = a.propose(fl.AMOUNT)
        assert tx_count == expected
        assert a.receive(b.receive(data)) == expected
    assert b.countersigned == 3
    assert b.latest.balance_receiver == Assets(3 * fl.AMOUNT.eth, 3 * fl.AMOUNT.token)
    assert a.in_flight == 0


def test_a_state_signed_by_a_wrong_key_is_refused() -> None:
    _, data = payer(WRONG_KEY).propose(fl.AMOUNT)
    with pytest.raises(fl.ProposalRefused) as refused:
        fl.check_proposal(fl.DOMAIN, fl.initial_state(), proposal(data))
    assert refused.value.reason is RejectReason.BAD_SIGNATURE

    b, a = payee(), payer()
    answer = b.receive(data)
    assert b.countersigned == 0
    a.propose(fl.AMOUNT)  # the same tx_count, so the payer has it in flight
    with pytest.raises(fl.FloorError, match="BAD_SIGNATURE"):
        a.receive(answer)
    # The refused state did not count: the real payer's first payment still fits.
    good_payer = payer()
    _, good = good_payer.propose(fl.AMOUNT)
    assert good_payer.receive(b.receive(good)) == 1


def test_a_countersign_by_a_wrong_key_is_refused() -> None:
    a = payer()
    _, data = a.propose(fl.AMOUNT)
    with pytest.raises(fl.FloorError, match="not by the payee"):
        a.receive(payee(WRONG_KEY).receive(data))


def test_a_countersign_of_nothing_in_flight_is_refused() -> None:
    a, b = payer(), payee()
    _, data = a.propose(fl.AMOUNT)
    answer = b.receive(data)
    a.receive(answer)
    with pytest.raises(fl.FloorError, match="not in flight"):
        a.receive(answer)


def _tampered(**changes: object) -> ThreadProposal:
    """The first payment's proposal with `changes` to its state, re-signed by the payer."""
    good = proposal(payer().propose(fl.AMOUNT)[1])
    state = dataclasses.replace(good.state, **changes)  # type: ignore[arg-type]
    return ThreadProposal(
        state, good.prev_tx_count, Signer(fl.PAYER_KEY).sign_thread_state(fl.DOMAIN, state)
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tx_count": 2}, RejectReason.NOT_SUCCESSOR),
        ({"thread_id": 2}, RejectReason.UNKNOWN_THREAD),
        ({"balance_receiver": Assets(2 * fl.AMOUNT.eth, 2)}, RejectReason.BALANCE_NOT_CONSERVED),
        ({"balance_sender": fl.LOCK, "balance_receiver": Assets()}, RejectReason.EMPTY_PAYMENT),
    ],
)
def test_a_proposal_that_is_no_payment_is_refused(
    changes: dict[str, object], reason: RejectReason
) -> None:
    with pytest.raises(fl.ProposalRefused) as refused:
        fl.check_proposal(fl.DOMAIN, fl.initial_state(), _tampered(**changes))
    assert refused.value.reason is reason


def test_value_moving_to_the_payer_is_refused() -> None:
    a, b = payer(), payee()
    a.receive(b.receive(a.propose(Assets(10, 10))[1]))
    latest = b.latest
    backwards = dataclasses.replace(
        latest,
        tx_count=2,
        balance_sender=latest.balance_sender + Assets(5, 0),
        balance_receiver=latest.balance_receiver - Assets(5, 0),
    )
    signature = Signer(fl.PAYER_KEY).sign_thread_state(fl.DOMAIN, backwards)
    with pytest.raises(fl.ProposalRefused) as refused:
        fl.check_proposal(fl.DOMAIN, latest, ThreadProposal(backwards, 1, signature))
    assert refused.value.reason is RejectReason.INVALID_TRANSITION


# ---------------------------------------------------------------- the floor over streams


async def test_payments_over_a_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    b = payee()
    a = payer()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            assert await fl.answer_payments(fl.FrameLink(right), b) == 5 + 40

        nursery.start_soon(serve)
        link = fl.FrameLink(left)
        assert len(await fl.pay_sequential(link, a, fl.AMOUNT, 5)) == 5
        assert len(await fl.pay_pipelined(link, a, fl.AMOUNT, 40, 7)) == 40
        await left.send_stream.aclose()
    assert b.countersigned == 45
    assert a.in_flight == 0


async def test_a_wrong_payer_fails_over_a_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fl.answer_payments, fl.FrameLink(right), payee())
        with pytest.raises(fl.FloorError, match="BAD_SIGNATURE"):
            await fl.pay_sequential(fl.FrameLink(left), payer(WRONG_KEY), fl.AMOUNT, 3)
        await left.send_stream.aclose()


def test_run_floor_in_two_processes() -> None:
    result = fl.run_floor(sequential=5, pipelined=30, window=4, warmup=2, time_limit=60)
    assert result["sequential"]["count"] == 5
    assert result["pipelined"]["count"] == 30
    for mode in ("sequential", "pipelined"):
        assert result[mode]["payments_per_s"] > 0
        assert 0 < result[mode]["latencies_ms"]["p50"] <= result[mode]["latencies_ms"]["p99"]


# ---------------------------------------------------------------- weft bench


POSITIVE = [
    name
    for name in bench_node.FIGURES
    if not name.endswith("_cpu_s_during_pipelined")
    and name not in ("hub_cpu_s_during_checkpoints", "rss_mb", "peak_rss_mb")
]


def test_a_tiny_run_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--runs", "1", "--sequential", "20", "--pipelined", "200", "--checkpoints", "3"]
    assert bench_node.main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "run 1/1" in captured.err
    for name in POSITIVE:
        assert isinstance(report[name], float | int), name
        assert math.isfinite(report[name]) and report[name] > 0, name
    for name in bench_node.FIGURES:
        if name.endswith("_cpu_s_during_pipelined") or name == "hub_cpu_s_during_checkpoints":
            assert math.isfinite(report[name]) and report[name] >= 0, name
    for name in ("rss_mb", "peak_rss_mb"):
        assert set(report[name]) == {"hub", "payer", "payee"}
        assert all(0 < mb < 10_000 for mb in report[name].values())
    (run,) = report["all"]
    for mode in ("sequential", "pipelined"):
        ratio = run[f"{mode}_payments_per_s"] / run[f"floor_{mode}_payments_per_s"]
        assert run[f"{mode}_ratio_to_floor"] == pytest.approx(ratio)
        assert report[f"{mode}_ratio_to_floor"] == pytest.approx(ratio)
    assert {name: report[name] for name in bench_node.FIGURES} == run
    assert report["runs"] == 1
    assert report["checkpoint_cycles"] == 3
    assert report["machine"]["cores"] >= 1
    assert report["machine"]["cpu"] and report["machine"]["python"]
    assert report["seconds"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--runs", "0"],
        ["--runs", "11"],
        ["--checkpoints", "0"],
        ["--window", "0"],
        ["--pipelined", "x"],
        ["--no-such-option"],
    ],
)
def test_bad_arguments_exit_2_with_the_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_node.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: weft bench")
    assert "Traceback" not in err


def test_bad_arguments_through_weft(capsys: pytest.CaptureFixture[str]) -> None:
    assert weft_main(["bench", "--runs", "0"]) == 2
    assert "usage: weft bench" in capsys.readouterr().err


def test_help_lists_the_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_node.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in bench_node.FIGURES:
        assert f"`{name}`" in out, name
