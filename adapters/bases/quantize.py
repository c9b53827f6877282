"""4-bit (bitsandbytes) details shared by training, evaluation and merging: keeping a 4-bit
base trainable on every CPU, the exact dequantize path, and the NF4 round trip a merge needs."""

from __future__ import annotations


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a Linear4bit called in eval mode with a no-grad input converts its
    weight for good to a packed inference layout whose kernel (gemv_4bit) has no autograd: once
    the base has been evaluated, training would then get no gradient through the frozen layers
    (or fail on an in-place bias add). Keeping one layout also makes eval numbers comparable.

    It is also the exact path: that kernel computes in bfloat16 (max |Δlogit| ~1e-2 on a small
    model), while training dequantizes and multiplies in the compute dtype, so a merge's
    reference must not take it either, nor the server in `--numerics fp32`. A layer already repacked (the model was run in eval
    mode before) is unpacked again, so its `weight.data` dequantizes to the weights once more.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = (
                    _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
                )


def quantized_weights(model) -> dict[str, dict]:
    """{module name: 4-bit settings} of every bitsandbytes 4-bit Linear in `model` (PEFT's
    `.base_layer` suffix dropped, so names match the unquantized model wrapped the same way)."""
    specs = {}
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not hasattr(state, "blocksize"):
            continue
        # bitsandbytes' CPU inference path repacks a layer on its first forward and rewrites
        # dtype/nested; the settings the weight was quantized with are kept as original_*.
        repacked = getattr(state, "packing_format_for_cpu", False)
        specs[name.removesuffix(".base_layer")] = {
            "blocksize": state.blocksize,
            "quant_type": state.quant_type,
            "double_quant": bool(state.original_nested if repacked else state.nested),
            "dtype": state.original_dtype if repacked else state.dtype,
        }
    return specs


def round_trip_weight(weight, spec: dict):
    """quantize_4bit → dequantize_4bit with the base's settings; back in the weight's dtype."""
    import bitsandbytes.functional as bnbf

    source = weight.data.to(spec["dtype"])
    packed, state = bnbf.quantize_4bit(
        source,
        blocksize=spec["blocksize"],
        compress_statistics=spec["double_quant"],
        quant_type=spec["quant_type"],
    )
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def round_trip_base(model, specs: dict[str, dict]) -> int:
    """Replace each quantized-at-training weight of `model` by its 4-bit round trip; the count."""
    import torch

    done = 0
    for name, module in model.named_modules():
        spec = specs.get(name.removesuffix(".base_layer"))
        if spec is None or not isinstance(module, torch.nn.Linear):
            continue
        with torch.no_grad():
            module.weight.data = round_trip_weight(module.weight, spec)
        done += 1
    return done
