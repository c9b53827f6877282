"""A merged adapter's config is canonical, as a trained one's: PEFT saves the union of the
parents' target modules in set order (which follows the process's string hashing), the stored
file lists them sorted, so the same merge gives the same digest in every process."""

from __future__ import annotations

import json

from adaptory.adapters.merging.merge import merge_adapters
from adaptory.adapters.testing import register_lora
from adaptory.registry import Registry

# Seven names: the union PEFT builds iterates in sorted order once in 5040 hash seeds.
A_TARGETS = ["v_proj", "q_proj", "up_proj", "gate_proj"]
B_TARGETS = ["o_proj", "k_proj", "down_proj", "q_proj"]


def test_a_merge_stores_the_union_of_target_modules_sorted(adaptory_home, tiny_llama_dir):
    registry = Registry(adaptory_home)
    register_lora(registry, tiny_llama_dir, "a", seed=1, targets=A_TARGETS)
    register_lora(registry, tiny_llama_dir, "b", seed=2, targets=B_TARGETS)
    result = merge_adapters(registry, ["a", "b"], name="ab", method="cat", evaluate=False)
    text = (registry.files(result.entry.ref) / "adapter_config.json").read_text()
    stored = json.loads(text)
    assert stored["target_modules"] == sorted(set(A_TARGETS) | set(B_TARGETS))
    assert list(stored) == sorted(stored)
