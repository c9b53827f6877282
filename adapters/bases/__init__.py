"""Base models: built-in and local bases loaded in 4 bits (NF4) with fingerprints, the 4-bit
details training and merging share, and small Llama-style bases built from scratch.
May import: registry."""
