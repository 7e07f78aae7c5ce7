"""datatrove pipeline steps: readers, cleaning formatters, filters and deduplication."""
