"""`weft recover` end to end as a user runs it, against a devnet of OS processes on the
embedded chain (`weft devnet up`), driven through `node.cli.main`.

u1 pays u2 on a thread; once u1's latest backup is held by the other nodes, u1's process
is stopped and its data directory deleted (only `node.key` and `config.json` remain);
`weft recover --config u1/config.json --devnet DIR` rebuilds the store, u1 runs again
(`python -m node.run`), pays on on the same thread and closes it: every payment counted
once, at u1 and at the hub. Then the failures: a second `weft recover` on the rebuilt store,
and a node whose backup nobody holds (a fresh key): exit 2, one line.

Every wait is bounded (no timing assertions); the `finally` calls `devnet down`, stops the
restarted u1 by its pid and, as a last resort, kills any recorded pid that still runs its
recorded command. The recovery's wall time is printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devnet.deploy import ETHER
from devnet.devnet import Devnet, DevnetNode, process_runs, read_devnet
from devnet.processes import REPO_ROOT, eventually, stop_process
from node.api import STORE_FILE
from node.backup import BACKUP_FILE, DEFAULT_INTERVAL
from node.cli import main
from node.control import ControlClient, assets_json, assets_of
from protocols.backup import decode_announcement
from protocols.recovery import RECOVERY_NONCE_GAP
from protocols.types import Address, Assets

DEPOSIT = Assets(2 * ETHER, 2 * 10**21)
LOCK = Assets(ETHER // 2, 5 * 10**20)
AMOUNT = Assets(1000, 7)
BEFORE, AFTER = 5, 3  # payments before the loss of u1's data, and after its recovery
CALL_GUARD = 90.0
REPLICATION_GUARD = 60.0


def recorded_pids(directory: Path) -> list[tuple[int, object]]:
    try:
        raw = json.loads((directory / "devnet.json").read_text())
    except (OSError, ValueError):
        return []
    return [(pid, marker) for _, pid, marker in Devnet.from_json(raw).processes()]


def kill_leftovers(recorded: list[tuple[int, object]]) -> None:
    for pid, marker in recorded:
        if process_runs(pid, marker):  # type: ignore[arg-type]
            os.kill(pid, signal.SIGKILL)


def weft(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`weft argv` through `node.cli.main`: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def restart_node(node_dir: Path) -> subprocess.Popen[bytes]:
    """Start the devnet node in `node_dir` again (`config.json`, log to `node.log`)."""
    with (node_dir / "node.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "node.run", "--config", str(node_dir / "config.json")],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )


# ---------------------------------------------------------------- backups.sqlite, read-only


def _read_only(data_dir: str | Path) -> sqlite3.Connection:
    path = Path(data_dir) / BACKUP_FILE
    return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)


def own_sequence(data_dir: str | Path) -> int:
    """The sequence of the last backup the node in `data_dir` announced (0: none yet)."""
    try:
        with _read_only(data_dir) as db:
            row = db.execute("SELECT sequence, announcement FROM own").fetchone()
    except sqlite3.Error:
        return 0  # not created yet, or busy
    if row is None or row[1] is None:
        return 0
    assert decode_announcement(bytes(row[1])).sequence == row[0]
    return int(row[0])


def replica_sequence(data_dir: str | Path, owner: Address) -> int:
    """The sequence of `owner`'s backup the node in `data_dir` keeps (blocks pinned; 0:
    none)."""
    try:
        with _read_only(data_dir) as db:
            row = db.execute(
                "SELECT announcement FROM replicas WHERE owner = ?", (owner.raw,)
            ).fetchone()
    except sqlite3.Error:
        return 0
    if row is None:
        return 0
    announcement = decode_announcement(bytes(row[0]))
    assert announcement.owner == owner
    return announcement.sequence


def held_by_all(owner: DevnetNode, others: list[DevnetNode]) -> int | None:
    """`owner`'s last announced sequence once every node of `others` keeps it, else None."""
    mine = own_sequence(owner.data_dir)
    address = Address.from_hex(owner.address)
    if mine > 0 and all(replica_sequence(o.data_dir, address) >= mine for o in others):
        return mine
    return None


# ---------------------------------------------------------------- the test


def test_recover_a_devnet_node_from_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "net"
    recorded: list[tuple[int, object]] = []
    restarted: subprocess.Popen[bytes] | None = None
    try:
        assert main(["devnet", "up", "--nodes", "3", "--dir", str(directory)]) == 0
        capsys.readouterr()
        devnet = read_devnet(directory)
        assert devnet is not None
        recorded = [(pid, marker) for _, pid, marker in devnet.processes()]
        hub, u1, u2, u3 = devnet.nodes
        u1_dir = Path(u1.data_dir).parent
        u1_address, u2_address = Address.from_hex(u1.address), Address.from_hex(u2.address)

        # u1 and u2 deposit, the hub collateralizes both, u1 pays u2 BEFORE times.
        with (
            ControlClient.from_data_dir(hub.data_dir, timeout=CALL_GUARD) as at_hub,
            ControlClient.from_data_dir(u1.data_dir, timeout=CALL_GUARD) as at_u1,
            ControlClient.from_data_dir(u2.data_dir, timeout=CALL_GUARD) as at_u2,
        ):
            for client in (at_u1, at_u2):
                client.call("deposit", amount=assets_json(DEPOSIT))
            for node in (u1, u2):
                at_hub.call("collateralize", user=node.address, amount=assets_json(LOCK))
            key = at_u1.call(
                "open_thread", peer=u2.address, lock=assets_json(LOCK), peer_lock=assets_json(LOCK)
            )
            for n in range(1, BEFORE + 1):
                assert at_u1.call("pay", key=key, amount=assets_json(AMOUNT)) == n
            paid_at = time.monotonic()
            u1_before = at_u1.call("balance")
            assert u1_before["open_threads"] == 1 and u1_before["tx_count"] >= 1

        # u1's latest backup is held by the hub, u2 and u3: their backups.sqlite (read-only)
        # keep u1's replica (blocks pinned) at u1's own last sequence. That sequence is taken
        # at least one backup interval after the last payment, so it covers it (announcements
        # are debounced by at most `backup_interval`, the devnet's default).
        others = [hub, u2, u3]
        deadline = paid_at + DEFAULT_INTERVAL + 1.0
        eventually(
            lambda: time.monotonic() >= deadline and held_by_all(u1, others),
            "u1's latest backup replicated to the hub, u2 and u3",
            timeout=REPLICATION_GUARD,
        )

        # u1 stops (SIGTERM by its recorded pid: a clean stop announces its last backup), and
        # that last backup is held by the others before u1's data directory is deleted.
        assert process_runs(u1.pid, u1.identity())
        os.kill(u1.pid, signal.SIGTERM)
        eventually(lambda: not process_runs(u1.pid, "node.run"), "u1 stopped")
        last = own_sequence(u1.data_dir)
        assert last > 0
        eventually(
            lambda: held_by_all(u1, others) == last,
            "u1's last backup held by every other node",
            timeout=REPLICATION_GUARD,
        )
        shutil.rmtree(u1.data_dir)
        assert sorted(p.name for p in u1_dir.iterdir() if p.name != "node.log") == [
            "config.json",
            "devnet-chain",
            "node.key",
        ]

        # `weft recover`: the store rebuilt from the newest backup the others hold.
        recover = ("recover", "--config", str(u1_dir / "config.json"), "--devnet", str(directory))
        started = time.monotonic()
        code, out, err = weft(capsys, *recover)
        took = time.monotonic() - started
        assert code == 0, (out, err)
        assert "Traceback" not in err
        lines = out.splitlines()
        assert lines[0].startswith(f"recovered {u1_address}: backup {last} from peer ")
        assert "1 channel(s), 1 thread(s)" in lines[0]
        assert f"sequence: {last}" in lines
        assert "channels: 1" in lines and "threads: 1" in lines
        assert any(line.startswith("from peer: ") for line in lines)
        with capsys.disabled():  # shown with `pytest -s`
            print(f"\nweft recover took {took:.2f} s (wall time): {lines[0]}")

        # Again, on the rebuilt store: refused, one line, nothing changed.
        code, out, err = weft(capsys, *recover)
        assert code == 2 and out == "" and err.count("\n") == 1, (out, err)
        assert err.startswith("weft: error: ") and "is not empty" in err

        # u1 runs again from the rebuilt store, resyncs with the hub and u2, and pays on.
        restarted = restart_node(u1_dir)

        def node_up() -> bool:
            if restarted is not None and restarted.poll() is not None:
                raise AssertionError(f"u1 exited {restarted.returncode}: see {u1_dir}/node.log")
            try:
                info = json.loads((Path(u1.data_dir) / "node.json").read_text())
            except (OSError, ValueError):
                return False
            return restarted is not None and bool(info.get("pid") == restarted.pid)

        eventually(node_up, "u1 restarted", timeout=CALL_GUARD)
        with (
            ControlClient.from_data_dir(hub.data_dir, timeout=CALL_GUARD) as at_hub,
            ControlClient.from_data_dir(u1.data_dir, timeout=CALL_GUARD) as at_u1,
            ControlClient.from_data_dir(u2.data_dir, timeout=CALL_GUARD) as at_u2,
        ):
            eventually(
                lambda: at_u1.call("status")["hub_connected"] is True,
                "u1 connected to the hub",
                timeout=CALL_GUARD,
            )
            status = at_u1.call("status")
            assert status["channels"] == 1 and len(status["threads"]) == 1
            assert status["threads"][0]["key"] == key
            # A restored side counts a random multiple of RECOVERY_NONCE_GAP nonces above its
            # backup as signed (SPEC.md, "Recovery: restoring the machines"): the thread's
            # tx_count jumps once, by a multiple of the gap, then goes on one by one.
            first = at_u1.call("pay", key=key, amount=assets_json(AMOUNT))
            gap = first - BEFORE - 1
            assert gap >= RECOVERY_NONCE_GAP and gap % RECOVERY_NONCE_GAP == 0
            resumed = BEFORE + gap
            for n in range(resumed + 2, resumed + AFTER + 1):
                assert at_u1.call("pay", key=key, amount=assets_json(AMOUNT)) == n
            final = at_u1.call("close_thread", key=key)
            total = Assets(AMOUNT.eth * (BEFORE + AFTER), AMOUNT.token * (BEFORE + AFTER))
            assert final["tx_count"] == resumed + AFTER
            assert assets_of(final["balance_receiver"]) == LOCK + total
            assert assets_of(final["balance_sender"]) + total == LOCK

            def settled(client: ControlClient, user: Address | None = None) -> bool:
                params = {} if user is None else {"user": user.checksum()}
                return bool(client.call("balance", **params)["open_threads"] == 0)

            checks = [(at_u1, None), (at_u2, None), (at_hub, u1_address), (at_hub, u2_address)]
            for client, user in checks:
                eventually(
                    lambda c=client, u=user: settled(c, u),  # type: ignore[misc]
                    "the thread settled",
                    CALL_GUARD,
                )

            # u2 got exactly every payment; u1 paid exactly that; the hub agrees with both.
            u1_final, u2_final = at_u1.call("balance"), at_u2.call("balance")
            hub_u1 = at_hub.call("balance", user=u1_address.checksum())
            hub_u2 = at_hub.call("balance", user=u2_address.checksum())
        assert assets_of(u2_final["user"]) == DEPOSIT + total
        assert assets_of(u1_final["user"]) + total == DEPOSIT
        for mine, hubs in ((u1_final, hub_u1), (u2_final, hub_u2)):
            assert assets_of(hubs["user"]) == assets_of(mine["user"])
            assert assets_of(hubs["hub"]) == assets_of(mine["hub"])
            assert mine["tx_count"] == hubs["tx_count"]
        assert assets_of(u1_final["hub"]) == LOCK + total
        assert assets_of(u2_final["hub"]) + total == LOCK

        # A node whose backup nobody holds (a fresh key, with u3's config otherwise):
        # refused, one line, nothing written.
        fresh = directory / "u9"
        fresh.mkdir()
        (fresh / "node.key").write_text(os.urandom(32).hex())
        config = json.loads((Path(u3.data_dir).parent / "config.json").read_text())
        config.update(key_file=str(fresh / "node.key"), data_dir=str(fresh / "data"))
        config.pop("listen_port", None)
        config.pop("control_port", None)
        (fresh / "config.json").write_text(json.dumps(config))
        code, out, err = weft(
            capsys,
            "recover",
            "--config",
            str(fresh / "config.json"),
            "--devnet",
            str(directory),
            "--timeout",
            "30",
        )
        assert code == 2 and out == "" and err.count("\n") == 1, (out, err)
        assert err.startswith("weft: error: no backup of 0x") and " reachable from " in err
        assert not (fresh / "data" / STORE_FILE).exists()
        assert not (fresh / "data" / BACKUP_FILE).exists()
    finally:
        recorded = recorded or recorded_pids(directory)
        try:
            main(["devnet", "down", "--dir", str(directory)])
        finally:
            kill_leftovers(recorded)
            if restarted is not None:
                stop_process(restarted)
