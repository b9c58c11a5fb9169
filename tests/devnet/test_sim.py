"""The in-process simulation (README's main job) balances, and notices when it does not."""

from __future__ import annotations

import pytest

from devnet import sim
from protocols.types import Assets


def test_sim_balances_every_wei(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.main(["--users", "4", "--payments", "400", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "every balance matches" in out
    assert "400 thread payments" in out


def test_sim_reports_a_skimmed_withdrawal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_execute = sim.Ledger.execute

    def skimming_execute(self: sim.Ledger, latest: sim.ch.SignedChannelState) -> None:
        """Pay every user withdrawal one wei short."""
        real_execute(self, latest)
        if latest.state.pending_withdrawal_user.eth > 0:
            self.paid_out[latest.state.recipient] -= Assets(1, 0)

    monkeypatch.setattr(sim.Ledger, "execute", skimming_execute)
    assert sim.main(["--users", "2", "--payments", "20"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_sim_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        sim.main(["--users", "1"])
