"""Lego-MT: multi-way translation with per-language-group branches and detachable flows."""

from pretrain.models.lego_mt.config import LegoMTConfig
from pretrain.models.lego_mt.flows import ALL, DEC, ENC, MIX, flow_names, parse_flows
from pretrain.models.lego_mt.model import LegoFlow, LegoMT, detach

__all__ = [
    "ALL",
    "DEC",
    "ENC",
    "MIX",
    "LegoFlow",
    "LegoMT",
    "LegoMTConfig",
    "detach",
    "flow_names",
    "parse_flows",
]
