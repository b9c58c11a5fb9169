"""Compile the Vyper contracts into the committed artifacts, or check that they match.

    python -m devnet.build_contracts          # write protocols/contracts/build/*.json
    python -m devnet.build_contracts --check  # exit 1 if an artifact differs from a fresh build

Needs the pinned compiler (`vyper`, in the `dev` extra). The node never compiles: it loads the
artifacts (`node.contracts`). An artifact holds the ABI, the deployment bytecode, the runtime
bytecode, the compiler version and the sha256 of the source it came from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "protocols" / "contracts"
BUILD_DIR = CONTRACTS_DIR / "build"
CONTRACTS = ("ChannelManager", "TestToken", "HostileToken", "Rejector")
COMPILER_VERSION = "0.4.3"
EVM_VERSION = "prague"


def compile_contract(name: str) -> dict[str, object]:
    """The artifact of `protocols/contracts/<name>.vy`, freshly compiled."""
    import vyper
    from vyper.compiler import compile_code
    from vyper.compiler.settings import Settings

    if not vyper.__version__.startswith(COMPILER_VERSION):
        raise SystemExit(f"need vyper {COMPILER_VERSION}, found {vyper.__version__}")
    source_path = CONTRACTS_DIR / f"{name}.vy"
    source = source_path.read_text()
    output = compile_code(
        source,
        contract_path=source_path.name,
        output_formats=["abi", "bytecode", "bytecode_runtime"],
        settings=Settings(evm_version=EVM_VERSION),
    )
    return {
        "contractName": name,
        "compiler": f"vyper {COMPILER_VERSION}",
        "evmVersion": EVM_VERSION,
        "sourceSha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": output["abi"],
        "bytecode": output["bytecode"],
        "runtimeBytecode": output["bytecode_runtime"],
    }


def render(artifact: dict[str, object]) -> str:
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devnet.build_contracts")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for name in CONTRACTS:
        text = render(compile_contract(name))
        path = BUILD_DIR / f"{name}.json"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            BUILD_DIR.mkdir(exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(CONTRACTS_DIR.parent.parent)}")
    if stale:
        print(
            f"artifacts differ from the sources: {', '.join(stale)}; "
            "run python -m devnet.build_contracts",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
