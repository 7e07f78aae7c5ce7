"""Parallel text for Lego-MT from gettext catalogs: extraction, cleaning, language-centric
grouping, a joint SentencePiece tokenizer with ``<2xx>`` tags, and tokenized pair files."""

from data_pipeline.bitext.clean import CleanConfig, clean_pair, normalize
from data_pipeline.bitext.gettext_pairs import iter_catalog, multiway_table
from data_pipeline.bitext.prepare import BitextConfig, lang_tag, prepare

__all__ = [
    "BitextConfig",
    "CleanConfig",
    "clean_pair",
    "iter_catalog",
    "lang_tag",
    "multiway_table",
    "normalize",
    "prepare",
]
