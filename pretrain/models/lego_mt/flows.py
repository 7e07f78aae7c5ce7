"""Flow bitmask: which encoder -> decoder routes a training step runs.

* ``DEC = 1``: Dec-Flow, main encoder -> group decoder branch;
* ``ENC = 2``: Enc-Flow, group encoder branch -> m2m decoder;
* ``MIX = 4``: Mix-Flow, main encoder -> m2m decoder.
"""

from __future__ import annotations

DEC, ENC, MIX = 1, 2, 4
ALL = DEC | ENC | MIX
NAMES = {"dec": DEC, "enc": ENC, "mix": MIX}


def flow_names(flows: int) -> list[str]:
    """``6 -> ["enc", "mix"]``; raises ``ValueError`` outside 1..7."""
    if type(flows) is not int or not 1 <= flows <= ALL:
        raise ValueError(f"flows must be an int bitmask in 1..7 (1 Dec, 2 Enc, 4 Mix), got {flows!r}")
    return [name for name, bit in NAMES.items() if flows & bit]


def parse_flows(text: str | int) -> int:
    """``"enc+mix"``, ``"6"`` or ``6`` -> ``6``."""
    if isinstance(text, int):
        flow_names(text)
        return text
    text = text.strip().lower()
    if text.isdigit():
        return parse_flows(int(text))
    value = 0
    for part in text.replace(",", "+").split("+"):
        if part not in NAMES:
            raise ValueError(f"unknown flow {part!r}; use dec, enc, mix or a bitmask 1..7")
        value |= NAMES[part]
    return value
