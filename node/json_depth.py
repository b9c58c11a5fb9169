"""How deep untrusted JSON nests, checked before `json.loads` parses it.

py-evm (which the node and the chain server import) raises Python's recursion limit to
100000, so `json.loads` no longer stops deeply nested input with a `RecursionError`: it
overflows the C stack and the whole process dies. The control interface (`node.control`)
and the chain server (`devnet.chain_server`) refuse such input first with
`json_depth_within`.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["json_depth_within"]

_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET: Final = re.compile(rb"[\[\]{}]")


def json_depth_within(text: bytes, limit: int) -> bool:
    """Whether the JSON text `text` nests arrays and objects at most `limit` deep.

    Brackets inside strings do not count; an unterminated string's do (so malformed
    input errs on the side of refusal). Linear in `len(text)`; never parses it.
    """
    if text.count(b"[") + text.count(b"{") <= limit:
        return True
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", text)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return False
        else:
            depth -= 1
    return True
