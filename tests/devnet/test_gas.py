"""The gas table (`python -m devnet.gas`) measures every function and adds its targets up.

The scenario runs once (a module fixture, ~3 s); the targets themselves are reported by
the tool, never asserted here.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from devnet import gas


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert gas.main(["--json"]) == 0
    data: dict[str, Any] = json.loads(out.getvalue())
    return data


def test_every_function_row_has_a_positive_gas(report: dict[str, Any]) -> None:
    functions = report["functions"]
    assert set(functions) == set(gas.FUNCTION_ROWS)
    for name, row in functions.items():
        assert type(row["gas"]) is int and row["gas"] > 21_000, name
        assert 21_000 < row["intrinsic"] < row["gas"], name
        assert row["intrinsic"] + row["execution"] == row["gas"], name


def test_every_contract_function_is_measured(report: dict[str, Any]) -> None:
    """Each state-changing function of the ABI has at least one row."""
    abi = gas.artifact("ChannelManager")["abi"]
    mutating = {
        item["name"]
        for item in abi
        if item["type"] == "function" and item["stateMutability"] in ("nonpayable", "payable")
    }
    measured = {name.split(":")[0].split(" ")[0] for name in report["functions"]}
    assert mutating <= measured


def test_composite_rows_are_the_sums_of_their_parts(report: dict[str, Any]) -> None:
    functions, targets = report["functions"], report["targets"]
    assert set(targets) == {t.name for t in gas.TARGETS}
    for t in gas.TARGETS:
        row = targets[t.name]
        assert row["parts"] == list(t.parts)
        assert row["gas"] == sum(functions[part]["gas"] for part in t.parts)
        assert row["target"] == t.limit
        assert row["ratio"] == round(row["gas"] / t.limit, 3)
        assert row["status"] == ("ok" if row["gas"] <= t.limit else "over")


def test_table_lists_every_row(report: dict[str, Any]) -> None:
    table = gas.render(report)
    for name in (*report["functions"], *report["targets"]):
        assert name in table
    assert table.count(" ok") + table.count(" over") == len(gas.TARGETS)
