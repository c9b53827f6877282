"""Serving many adapters on one base: the runtime (resident adapters, batched decode), the
LoRA bank, the scheduler and the OpenAI-compatible server. May import: bases and registry.
"""
