"""`weft bench` (devnet.bench_node) and its floor (devnet.bench_floor).

The floor must really check what it claims to check (the signatures, the successor, the
conserved total), or its rate would be no floor at all; the benchmark must report every
documented figure, refuse bad arguments with a usage message, and end a failed run with
one line and exit code 1, every node process it started stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from devnet import bench_floor as fl
from devnet import bench_node
from devnet.processes import Deployment, NodeProcess, ProcessError
from node.chain_errors import ChainUnavailable
from node.cli import main as weft_main
from node.control import ControlError, _percentile
from protocols.keccak import keccak
from protocols.messages import RejectReason, ThreadProposal
from protocols.signing import Signer
from protocols.types import Address, Assets
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


@pytest.mark.parametrize(
    "values", [[], [2.0], [1.0, 2.0], [float(i) for i in range(1, 101)], [0.5] * 7 + [3.0]]
)
def test_the_floor_percentile_is_the_nodes(values: list[float]) -> None:
    for q in (0.0, 0.01, 0.5, 0.9, 0.99, 1.0):
        assert fl.percentile(values, q) == _percentile(values, q)


def test_the_floor_processes_load_no_node_code() -> None:
    code = (
        "import sys, devnet.bench_floor; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('node', 'libp2p')))"
    )
    repo = Path(fl.__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


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
    and not name.startswith("hub_cpu_")
    and name not in ("rss_mb", "peak_rss_mb")
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
        if name.endswith("_cpu_s_during_pipelined") or name.startswith("hub_cpu_"):
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
    assert report["hub_cpu_ms_per_checkpoint"] == pytest.approx(
        1000 * report["hub_cpu_s_during_checkpoints"] / (2 * 2 * 3)
    )
    assert report["runs"] == 1
    assert report["relaxed"] is False
    assert report["backups"] is True
    assert report["checkpoint_cycles"] == 3
    assert report["machine"]["cores"] >= 1
    assert report["machine"]["cpu"] and report["machine"]["python"]
    assert report["seconds"] > 0
    bench_node.print_report(report, None)  # the report without --json
    text = capsys.readouterr().out
    assert "hub checkpoints:" in text and "ms per open or close" in text


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


# ---------------------------------------------------------------- failed runs


def error_lines(err: str) -> list[str]:
    """The error lines of `main`'s stderr, after checking there is no traceback."""
    assert "Traceback" not in err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("weft bench: error:")]
    assert errors and lines[-1] == errors[-1]
    return errors


def processes_mentioning(text: str) -> list[str]:
    """The command lines of the running processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if text in command:
            found.append(command)
    return found


def never(check: Callable[[], object], what: str, timeout: float = 0.0) -> None:
    raise TimeoutError(f"never happened (test): {what}")


def test_a_failed_setup_stops_every_node_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first setup step after all three processes came up (and the clients connected)
    fails: every process is stopped, and the failure is one line."""
    started: list[NodeProcess] = []

    class Recorded(NodeProcess):
        def start(self, env: dict[str, str] | None = None) -> None:
            super().start(env)
            started.append(self)

    monkeypatch.setattr(bench_node, "NodeProcess", Recorded)
    monkeypatch.setattr(bench_node, "eventually", never)
    assert bench_node.main(["--runs", "1", "--sequential", "5", "--pipelined", "5"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = error_lines(captured.err)
    assert line == "weft bench: error: TimeoutError: never happened (test): A connected to the hub"
    assert [node.name for node in started] == ["hub", "a", "b"]
    for node in started:  # exited, and reaped
        assert node.process is not None and node.process.poll() is not None, node.name
    (root,) = {node.dir.parent for node in started}
    assert processes_mentioning(str(root)) == []


def fake_deployment() -> Deployment:
    keys = {name: keccak(name.encode()) for name in ("hub", "a", "b")}
    return Deployment("http://127.0.0.1:9", Address(b"\x01" * 20), Address(b"\x02" * 20), 0, keys)


@pytest.fixture
def no_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """No chain server and no contracts: `main` reaches the network of its first run."""

    @contextmanager
    def served_chain() -> Iterator[str]:
        yield "http://127.0.0.1:9"

    async def deploy(url: str) -> Deployment:
        return fake_deployment()

    monkeypatch.setattr(bench_node, "served_chain", served_chain)
    monkeypatch.setattr(bench_node, "deploy", deploy)


@pytest.mark.usefixtures("no_chain")
def test_relaxed_and_no_backups_hold_for_their_own_run_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configs: list[dict[str, Any]] = []

    class Unstarted:
        """Records its config, then refuses to start."""

        def __init__(self, root: Path, name: str, config: dict[str, Any], key: bytes) -> None:
            self.name = name
            configs.append(config)

        def start(self, env: dict[str, str] | None = None) -> None:
            raise ProcessError(f"{self.name} not started (test)")

        def stop(self) -> None:
            return None

        def log_tail(self, lines: int = 30) -> str:
            return "(no log)"

    monkeypatch.setattr(bench_node, "NodeProcess", Unstarted)
    assert bench_node.main(["--runs", "1", "--relaxed"]) == 1
    assert bench_node.main(["--runs", "1"]) == 1
    assert bench_node.main(["--runs", "1", "--no-backups"]) == 1
    relaxed, strict, no_backups = configs
    assert relaxed["relaxed_commits"] is True
    assert "relaxed_commits" not in strict and "relaxed_commits" not in no_backups
    assert no_backups["backups"] is False
    assert "backups" not in strict and "backups" not in relaxed  # on, by default
    assert relaxed["poll_interval"] == strict["poll_interval"] == bench_node.QUIET_POLL_INTERVAL
    assert error_lines(capsys.readouterr().err) == 3 * [
        "weft bench: error: ProcessError: hub not started (test)"
    ]


NO_RATE = {
    "count": 20,
    "seconds": 0.0,
    "payments_per_s": None,
    "tx_count": 20,
    "latencies_ms": {"p50": 0.0, "p90": 0.0, "p99": 0.0},
}


class NoRateClient:
    """A's control client whose `bench_pay` reports no rate."""

    def call(self, method: str, /, **params: Any) -> Any:
        return {**NO_RATE, "count": params["count"]} if method == "bench_pay" else "0x01"

    def close(self) -> None:
        pass


def raising(exc: Exception) -> Callable[..., Any]:
    def fail(*args: object, **kwargs: object) -> Any:
        raise exc

    return fail


async def no_chain_at_all(url: str) -> Deployment:
    raise ChainUnavailable(f"no chain at {url}")


def no_rate_network(net: bench_node.Network, *args: object) -> None:
    net.clients["a"] = NoRateClient()  # type: ignore[assignment]


@pytest.mark.usefixtures("no_chain")
@pytest.mark.parametrize(
    ("name", "replacement", "error"),
    [
        ("deploy", no_chain_at_all, "ChainUnavailable: no chain at http://127.0.0.1:9"),
        (
            "start_network",
            raising(ControlError("ConnectionError", "control connection failed")),
            "ControlError: ConnectionError: control connection failed",
        ),
        (
            "start_network",
            raising(ProcessError("hub exited with 1:\nTraceback (most recent call last):")),
            "ProcessError: hub exited with 1:",
        ),
        (
            "start_network",
            raising(TimeoutError("never happened within 60 s: A connected to the hub")),
            "TimeoutError: never happened within 60 s: A connected to the hub",
        ),
        (
            "start_network",
            no_rate_network,
            "BenchError: node sequential payments (bench_pay): no payment rate "
            "(200 payments in 0.0 s, rate None)",
        ),
    ],
)
def test_a_failed_run_is_one_line_and_exit_1(
    name: str,
    replacement: Callable[..., Any],
    error: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(bench_node, name, replacement)
    assert bench_node.main(["--runs", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert error_lines(captured.err) == [f"weft bench: error: {error}"]


def test_a_floor_without_a_rate_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    floor = {
        mode: {**NO_RATE, "payer_cpu_s": 0.0, "payments_per_s": rate}
        for mode, rate in (("sequential", 1000.0), ("pipelined", 0.0))
    }
    monkeypatch.setattr(bench_node, "run_floor", lambda *args, **kwargs: floor)
    with pytest.raises(bench_node.BenchError, match="floor pipelined payments: no payment rate"):
        bench_node.measure_floor(20, 20, 4)


class CountingClient:
    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> CountingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def call(self, method: str, /, **params: Any) -> Any:
        self.calls += 1
        return "0x01"


def test_checkpoint_cycles_stop_once_the_other_pair_failed() -> None:
    client, peer = CountingClient(), fake_deployment().address("b")
    deadline = time.monotonic() + 60
    assert bench_node.checkpoint_cycles(client, peer, 2, deadline)  # type: ignore[arg-type]
    assert client.calls == 2 * 3
    given_up = threading.Event()
    given_up.set()
    with pytest.raises(bench_node.BenchError, match="given up after 0 of 5 cycles"):
        bench_node.checkpoint_cycles(client, peer, 5, deadline, given_up)  # type: ignore[arg-type]
    assert client.calls == 2 * 3


def test_the_fsync_baseline_is_measured_in_the_directory_and_cleaned_up(tmp_path: Path) -> None:
    assert 0 < bench_node.measure_fsync(tmp_path) < 10_000
    assert list(tmp_path.iterdir()) == []
