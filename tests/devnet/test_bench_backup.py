"""`weft bench-backup` (devnet/bench_backup.py): a tiny run reports every figure, checked
for consistency (not for speed); bad arguments and a failed run are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import trio

from devnet import bench_backup
from node.cli import main as weft_main

FIGURES = (
    "quiet_announce_ms",
    "burst_announce_ms",
    "close_announce_ms",
    "recovery_store_ms",
    "recovery_first_payment_ms",
    "backup_bytes",
    "announcements",
)


def test_a_tiny_run_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--runs", "1", "--users", "2", "--burst", "3", "--interval", "0.5", "--json"]
    assert bench_backup.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "run 1/1: recovery" in captured.err
    for name in FIGURES:
        assert math.isfinite(report[name]) and report[name] > 0, name
    for kind in bench_backup.KINDS:
        lags = report[f"{kind}_lag_ms"]
        assert list(lags) == ["k1", "k2"]  # the hub and the other user
        # Sorted by k; a replica keeps the backup only after it was announced.
        assert report[f"{kind}_announce_ms"] <= lags["k1"] <= lags["k2"], kind
    # The recovery's phases are in order and end with the store written; the first payment
    # comes after it.
    phases = report["recovery_phases_ms"]
    assert list(phases)[-2:] == ["written", "host closed"]
    assert list(phases.values()) == sorted(phases.values())
    assert phases["host closed"] == pytest.approx(report["recovery_store_ms"], abs=50)
    assert report["recovery_first_payment_ms"] > report["recovery_store_ms"]
    # At least the announcements of the three changes measured, and of the setup.
    assert report["announcements"] >= 4
    (run,) = report["all"]
    assert {name: report[name] for name in run} == run
    assert (report["runs"], report["users"], report["burst"]) == (1, 2, 3)
    assert report["interval_s"] == 0.5
    bench_backup.print_report(report)  # the report without --json
    text = capsys.readouterr().out
    assert "replication lag of A's backup to its 2 replicas" in text
    assert "last payment of a burst of 3" in text and "store rebuilt after" in text


@pytest.mark.parametrize(
    "argv",
    [["--runs", "0"], ["--users", "1"], ["--burst", "0"], ["--interval", "0"], ["--users", "x"]],
)
def test_bad_arguments_exit_2_with_the_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_backup.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: weft bench-backup") and "Traceback" not in err


def test_through_weft(capsys: pytest.CaptureFixture[str]) -> None:
    assert weft_main(["bench-backup", "--runs", "0"]) == 2
    assert "usage: weft bench-backup" in capsys.readouterr().err
    assert weft_main(["bench-backup", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("quiet_lag_ms", "recovery_store_ms", "recovery_first_payment_ms"):
        assert f"`{key}`" in out


def test_a_failed_run_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def never_replicated(
        root: Path, users: int, burst: int, interval: float, progress: object
    ) -> None:
        async with trio.open_nursery():  # failures arrive wrapped in exception groups
            raise bench_backup.BenchError("A's latest backup not kept by all after 30 s")

    monkeypatch.setattr(bench_backup, "one_run", never_replicated)
    assert bench_backup.main(["--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "weft bench-backup: error: BenchError: A's latest backup not kept by all after 30 s"
    )
