"""Combining adapters and baking them into bases: merges, merged/vLLM exports, diffs and
logit comparisons. May import: bases, training (evaluation) and registry.
"""
