"""Fixtures of the chain tests: one anvil for the session, and `chain`, which runs a test
on a fresh embedded chain and again on that anvil (skipped only where npm is missing; see
`tests/node/anvil.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.chain import ChainService
from tests.node.anvil import require_anvil, running_anvil


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    with running_anvil(require_anvil()) as url:
        yield url


@pytest.fixture(params=["embedded", "anvil"])
def chain(request: pytest.FixtureRequest) -> Iterator[ChainService]:
    if request.param == "embedded":
        service = ChainService.embedded()
    else:
        service = ChainService.from_url(request.getfixturevalue("anvil_url"), poll_interval=0.01)
    try:
        yield service
    finally:
        service.close()
