"""The README's embedding example runs: real nodes, real payments, on the embedded chain."""

from __future__ import annotations

from pathlib import Path

import pytest

from devnet import example


async def test_embedding_example_pays_and_withdraws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await example.main(tmp_path)
    out = capsys.readouterr().out
    assert "thread closed at tx 10: Bob got Assets(eth=10000000000000000, token=0)" in out
    assert "her channel now holds Assets(eth=0, token=0)" in out


def test_readme_shows_the_example_as_it_is() -> None:
    """The README's embedding code is the body of devnet/example.py's `main`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    source = Path(example.__file__).read_text()
    start = source.index("async def main(root: Path) -> None:")
    end = source.index("\n\n\nif __name__")
    body = source[start:end]
    assert body in readme
