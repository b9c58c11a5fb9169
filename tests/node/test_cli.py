"""The `weft` command line: version, keygen, address, the dispatch of sim, bench, node run
and devnet demo, and its error lines."""

from __future__ import annotations

import stat
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from eth_account import Account

from node.cli import main, parse_private_key
from protocols.errors import InvalidValue

VALID_KEY_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_error_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("weft: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "version")
    assert (code, out, err) == (0, metadata.version("weft") + "\n", "")


def test_keygen_writes_owner_only_key_and_prints_its_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "node.key"
    code, out, err = run(capsys, "keygen", "--out", str(key_file))
    assert (code, err) == (0, "")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = parse_private_key(key_file.read_text())
    assert out == Account.from_key(key).address + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temporary file left


def test_keygen_makes_a_new_key_each_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "keygen", "--out", str(tmp_path / "a"))[0] == 0
    assert run(capsys, "keygen", "--out", str(tmp_path / "b"))[0] == 0
    assert (tmp_path / "a").read_text() != (tmp_path / "b").read_text()


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "node.key"
    key_file.write_text("precious\n")
    code, out, err = run(capsys, "keygen", "--out", str(key_file))
    assert_error_line(code, out, err, str(key_file), "--force")
    assert key_file.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_keygen_force_overwrites_with_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "node.key"
    key_file.write_text("old\n")
    key_file.chmod(0o644)
    code, out, _ = run(capsys, "keygen", "--out", str(key_file), "--force")
    assert code == 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert out == Account.from_key(parse_private_key(key_file.read_text())).address + "\n"


def test_keygen_without_out_prints_key_and_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keygen")
    assert code == 0
    assert err == Account.from_key(parse_private_key(out)).address + "\n"


def test_keygen_into_missing_directory_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "keygen", "--out", str(tmp_path / "missing" / "node.key"))
    assert_error_line(code, out, err, "cannot write key file")


@pytest.mark.parametrize(
    "text", [VALID_KEY_HEX, "0x" + VALID_KEY_HEX + "\n", f"  {VALID_KEY_HEX}\n"]
)
def test_address_matches_eth_account(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "node.key"
    key_file.write_text(text)
    code, out, err = run(capsys, "address", "--key", str(key_file))
    assert (code, out, err) == (0, Account.from_key(VALID_KEY_HEX).address + "\n", "")


def test_address_of_missing_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.key"
    assert_error_line(*run(capsys, "address", "--key", str(missing)), "not found", str(missing))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello\n",
        VALID_KEY_HEX[:-2].encode(),
        (VALID_KEY_HEX + "00").encode(),
        ("zz" + VALID_KEY_HEX[2:]).encode(),
        b"00" * 32,  # zero is not a private key
        b"ff" * 32,  # above the group order
        b"\xff\xfe" + VALID_KEY_HEX.encode(),  # not ASCII
    ],
)
def test_address_of_malformed_key_file(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "bad.key"
    key_file.write_bytes(content)
    assert_error_line(*run(capsys, "address", "--key", str(key_file)), str(key_file))


def test_address_of_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error_line(*run(capsys, "address", "--key", str(tmp_path)), "cannot read key file")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["version", "extra"],
        ["address"],
        ["keygen", "--out"],
        ["node"],
        ["node", "run"],
        ["devnet", "up", "--bogus"],
    ],
)
def test_usage_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert_error_line(*run(capsys, *argv))


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "keygen" in out


@pytest.mark.parametrize(
    ("command", "module"), [("sim", "devnet.sim"), ("bench", "devnet.bench_node")]
)
def test_sim_and_bench_pass_arguments_through(
    command: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_main(args: list[str]) -> int:
        calls.append(args)
        return 7

    fake = types.ModuleType(module)
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module, fake)
    assert main([command, "--users", "3", "-h", "extra"]) == 7
    assert main([command]) == 7
    assert calls == [["--users", "3", "-h", "extra"], []]


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["sim"], "devnet.sim"),
        (["bench"], "devnet.bench_node"),
        (["devnet", "demo"], "devnet.demo"),
    ],
)
def test_a_missing_module_is_one_error_line(
    argv: list[str],
    module: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    assert_error_line(*run(capsys, *argv), module)


def test_node_run_passes_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_main(args: list[str]) -> int:
        calls.append(args)
        return 3

    fake = types.ModuleType("node.run")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "node.run", fake)
    assert main(["node", "run", "--config", str(tmp_path / "c.json")]) == 3
    assert calls == [["--config", str(tmp_path / "c.json")]]


def test_parse_private_key_rejects_wrong_length() -> None:
    with pytest.raises(InvalidValue):
        parse_private_key("0x1234")


def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("weft")
    assert script.exists(), "the weft console script is installed by `pip install -e .`"
    result = subprocess.run(
        [str(script), "address", "--key", str(tmp_path / "missing.key")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"weft: error: key file not found: {tmp_path}/missing.key"
    ]
