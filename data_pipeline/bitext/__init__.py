"""Parallel text for Lego-MT: pairs from gettext catalogs or TSV/JSONL files, cleaned and
language-checked by a datatrove pipeline, grouped into language-centric sets, a joint
SentencePiece tokenizer with ``<2xx>`` tags, and tokenized pair files."""

from data_pipeline.bitext.clean import CleanConfig, clean_pair, normalize
from data_pipeline.bitext.config import BitextConfig, BitextInput, LanguageCheckConfig, parse_input_spec
from data_pipeline.bitext.gettext_pairs import iter_catalog, multiway_table
from data_pipeline.bitext.prepare import lang_tag, prepare

__all__ = [
    "BitextConfig",
    "BitextInput",
    "CleanConfig",
    "LanguageCheckConfig",
    "clean_pair",
    "iter_catalog",
    "lang_tag",
    "multiway_table",
    "normalize",
    "parse_input_spec",
    "prepare",
]
