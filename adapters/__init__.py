"""Adaptory's engine, one room per capability (docs/ARCHITECTURE.md): bases/ (4-bit loading,
fingerprints, tiny bases), methods/ (adapter kinds), training/ (data, loop, evaluation),
serving/ (runtime, LoRA bank, scheduler, server), merging/ (merge, export, diff), bench/.
May import: registry (storage); the CLI sits on top and nothing here imports it."""
