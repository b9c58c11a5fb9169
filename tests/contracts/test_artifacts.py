"""The committed contract artifacts are exactly what the pinned compiler makes of the sources."""

from __future__ import annotations

import hashlib
import json

import pytest

from devnet import build_contracts


@pytest.mark.parametrize("name", build_contracts.CONTRACTS)
def test_artifact_matches_a_fresh_compile(name: str) -> None:
    path = build_contracts.BUILD_DIR / f"{name}.json"
    committed = path.read_text()
    fresh = build_contracts.render(build_contracts.compile_contract(name))
    assert committed == fresh, (
        f"{path} differs from a fresh compile of {name}.vy; run python -m devnet.build_contracts"
    )


@pytest.mark.parametrize("name", build_contracts.CONTRACTS)
def test_artifact_names_its_source(name: str) -> None:
    artifact = json.loads((build_contracts.BUILD_DIR / f"{name}.json").read_text())
    source = (build_contracts.CONTRACTS_DIR / f"{name}.vy").read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest()
    assert artifact["compiler"] == "vyper 0.4.3"


def test_check_mode_detects_a_stale_artifact(tmp_path, monkeypatch) -> None:
    for name in build_contracts.CONTRACTS:
        (tmp_path / f"{name}.json").write_text(
            (build_contracts.BUILD_DIR / f"{name}.json").read_text()
        )
    monkeypatch.setattr(build_contracts, "BUILD_DIR", tmp_path)
    assert build_contracts.main(["--check"]) == 0
    stale = json.loads((tmp_path / "Rejector.json").read_text())
    stale["bytecode"] = stale["bytecode"][:-2] + "00"
    (tmp_path / "Rejector.json").write_text(build_contracts.render(stale))
    assert build_contracts.main(["--check"]) == 1
