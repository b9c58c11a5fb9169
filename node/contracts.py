"""The compiled contracts, loaded from the committed artifacts at run time.

`devnet/build_contracts.py` compiles `protocols/contracts/*.vy` into
`protocols/contracts/build/<Name>.json`; the node never imports a compiler. An artifact
holds the ABI, the deployment bytecode and the runtime bytecode (plus the compiler version
and the source's sha256, which the node does not need).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import protocols

CHANNEL_MANAGER = "ChannelManager"
TEST_TOKEN = "TestToken"
HOSTILE_TOKEN = "HostileToken"


def build_dir() -> Path:
    """`protocols/contracts/build`, found beside the installed `protocols` package."""
    return Path(protocols.__file__).resolve().parent / "contracts" / "build"


class ArtifactError(Exception):
    """A contract artifact is missing or malformed."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"contract artifact {name!r}: {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Artifact:
    """One compiled contract: ABI, deployment bytecode, runtime bytecode (both raw bytes)."""

    name: str
    abi: tuple[dict[str, Any], ...]
    bytecode: bytes
    runtime_bytecode: bytes

    def abi_list(self) -> list[dict[str, Any]]:
        """The ABI as the list web3 takes."""
        return list(self.abi)


def _hex_bytes(name: str, data: dict[str, Any], key: str) -> bytes:
    value = data.get(key)
    if not isinstance(value, str):
        raise ArtifactError(name, f"{key!r} is missing or not a string")
    body = value[2:] if value.startswith(("0x", "0X")) else value
    try:
        raw = bytes.fromhex(body)
    except ValueError as exc:
        raise ArtifactError(name, f"{key!r} is not hex") from exc
    if not raw:
        raise ArtifactError(name, f"{key!r} is empty")
    return raw


def parse_artifact(name: str, text: str) -> Artifact:
    """Parse an artifact's JSON text; raise `ArtifactError` if it is malformed."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(name, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(name, "not a JSON object")
    abi = data.get("abi")
    if not isinstance(abi, list) or not all(isinstance(entry, dict) for entry in abi):
        raise ArtifactError(name, "'abi' is missing or not a list of objects")
    return Artifact(
        name=name,
        abi=tuple(abi),
        bytecode=_hex_bytes(name, data, "bytecode"),
        runtime_bytecode=_hex_bytes(name, data, "runtimeBytecode"),
    )


@cache
def load_artifact(name: str) -> Artifact:
    """The artifact `protocols/contracts/build/<name>.json` (read once, then cached).

    Raise `ArtifactError` if the file is missing, unreadable or malformed.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ArtifactError(name, "not a contract name")
    path = build_dir() / f"{name}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ArtifactError(name, f"{path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(name, f"cannot read {path} ({exc})") from exc
    return parse_artifact(name, text)
