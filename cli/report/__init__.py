"""Presentation of the registry: the static HTML page and the pictures (loss curves). Reads
the registry; stores nothing."""
