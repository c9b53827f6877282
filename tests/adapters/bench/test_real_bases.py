"""Real-size benchmark bases: the 1b and 8b skeletons have the published Llama shapes and
parameter counts without allocating anything, and the in-place builder (random weights made
on the device and quantized there) gives a working 4-bit Llama: on a scaled-down shape it
equals transformers' own Llama holding the same (dequantized) weights."""

from __future__ import annotations

import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from adaptory.adapters.bases.quantize import keep_4bit_trainable
from adaptory.adapters.bases.shapes import (
    SIZES,
    Size,
    build_random_base,
    count_params,
    llama_config,
    skeleton,
)

DEVICE = os.environ.get("ADAPTORY_TEST_DEVICE", "cpu")

# Published sizes: meta-llama/Llama-3.2-1B (tied embeddings) and meta-llama/Meta-Llama-3-8B.
PUBLISHED = {
    "1b": dict(params=1_235_814_400, hidden=2048, layers=16, heads=32, kv_heads=8,
               intermediate=8192, vocab=128256, tied=True),
    "8b": dict(params=8_030_261_248, hidden=4096, layers=32, heads=32, kv_heads=8,
               intermediate=14336, vocab=128256, tied=False),
}  # fmt: skip


def _llama_params(hidden, layers, heads, kv_heads, intermediate, vocab, tied) -> int:
    """A Llama's parameters from its shapes: embeddings (+ an untied head), and per layer the
    attention (q, k, v, o; k and v at kv_heads x head_dim), the gated MLP and two RMSNorms."""
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if tied else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


@pytest.mark.parametrize("size", ["1b", "8b"])
def test_real_sizes_have_the_published_shapes_on_the_meta_device(size):
    want = PUBLISHED[size]
    model = skeleton(llama_config(size))
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    counted = count_params(model)
    assert counted == want["params"]
    assert counted == _llama_params(*(want[k] for k in (
        "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied")))  # fmt: skip
    hidden, kv = want["hidden"], want["kv_heads"] * want["hidden"] // want["heads"]
    layer = model.model.layers[0]
    assert len(model.model.layers) == want["layers"]
    assert layer.self_attn.q_proj.weight.shape == (hidden, hidden)
    assert layer.self_attn.k_proj.weight.shape == (kv, hidden)
    assert layer.self_attn.v_proj.weight.shape == (kv, hidden)
    assert layer.mlp.gate_proj.weight.shape == (want["intermediate"], hidden)
    assert layer.mlp.down_proj.weight.shape == (hidden, want["intermediate"])
    assert model.model.embed_tokens.weight.shape == (want["vocab"], hidden)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied is want["tied"]
    assert not SIZES[size].saved  # never built on the CPU and saved


# A scaled-down real-size shape: grouped KV heads, an untied head, and a model vocabulary
# twice the tokenizer's, as at 1b/8b (128,256 ids for a tokenizer of a few thousand).
SMALL = Size(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1024,
             context=256, tie_embeddings=False, saved=False)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in-place") / "small-real"
    return build_random_base(SMALL, folder, device=DEVICE, seed=3, tokenizer_vocab=512)


def test_in_place_base_is_4bit_on_its_device(built):
    model = built.model
    # an earlier test's inference forward may have repacked the layers for bitsandbytes' CPU
    # kernel (AVX512-BF16 CPUs); unpacked, they are the layout the base was built with
    keep_4bit_trainable(model)
    assert built.device == DEVICE and built.quant == "nf4"
    linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")}
    assert len(linears) == 7 * SMALL.layers
    for name, module in linears.items():
        assert isinstance(module, bnb.nn.Linear4bit), name
        assert module.weight.dtype == torch.uint8 and module.weight.quant_state is not None
        assert module.weight.quant_type == "nf4" and module.weight.quant_state.nested
        assert module.weight.device.type == torch.device(DEVICE).type
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    expected = _llama_params(SMALL.hidden, SMALL.layers, SMALL.heads, SMALL.kv_heads,
                             SMALL.intermediate, SMALL.vocab, SMALL.tie_embeddings)  # fmt: skip
    assert built.extra["params"] == expected
    # random weights were really made (not left empty): NF4 keeps their spread
    q = linears["model.layers.0.self_attn.q_proj"].weight
    w = bnbf.dequantize_4bit(q.data, q.quant_state).float()
    assert 0.015 < w.std().item() < 0.025
    assert model.is_loaded_in_4bit and model.config.quantization_config.load_in_4bit


def test_in_place_base_equals_transformers_llama_with_its_weights(built):
    """Its forward is a Llama's: transformers' own LlamaForCausalLM given the dequantized
    weights (float32, on the CPU) computes the same logits."""
    from transformers import LlamaForCausalLM

    model = built.model
    keep_4bit_trainable(model)  # fp32 dequantize path, unpacked if an earlier test ran it
    reference = LlamaForCausalLM(llama_config(SMALL, vocab=SMALL.vocab,
                                              tokenizer=built.tokenizer)).float().eval()  # fmt: skip
    fresh = dict(reference.named_parameters())
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert len(norms) == 2 * SMALL.layers + 1
    for name in norms:  # initialised as transformers initialises a Llama's norms
        assert torch.equal(model.get_parameter(name).float().cpu(), fresh[name]), name
    state = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        elif weight is not None and name:
            state[f"{name}.weight"] = weight
    missing, unexpected = reference.load_state_dict(
        {k: v.detach().float().cpu() for k, v in state.items()}, strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.tensor([[5, 17, 42, 99, 300, 7], [8, 9, 10, 11, 12, 13]])
    with torch.inference_mode():
        got = model(input_ids=ids.to(DEVICE)).logits.float().cpu()
        want = reference(input_ids=ids).logits
    assert got.shape == (2, 6, SMALL.vocab)
    tolerance = 1e-4 if DEVICE == "cpu" else 0.1  # bf16 activations on a GPU
    assert (got - want).abs().max().item() < tolerance


def test_in_place_base_never_picks_an_id_the_tokenizer_lacks(built):
    """Greedy decoding on the 1,024-id model only picks ordinary tokenizer ids: the head rows of
    unknown ids (which decode to no text at all) and of special tokens are zero."""
    tokenizer, model = built.tokenizer, built.model
    known = len(tokenizer)
    assert known == 512 and model.config.vocab_size == SMALL.vocab
    assert tokenizer.decode([known + 5]) == ""  # why it matters: such an id streams nothing
    head = model.lm_head.weight
    assert torch.count_nonzero(head[known:]) == 0
    assert all(torch.count_nonzero(head[i]) == 0 for i in tokenizer.all_special_ids)
    ids = torch.randint(10, known, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(DEVICE), attention_mask=torch.ones_like(ids).to(DEVICE),
                             max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out[:, 6:]
    assert new.shape == (4, 12)  # never stopped early at eos
    assert new.max().item() < known
    assert not set(new.flatten().tolist()) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(new[0].tolist())  # text, not nothing


def test_in_place_base_has_a_stable_identity(tmp_path, built):
    """Its fingerprint names the random weights (shape, seed, device, dtype) and the tokenizer:
    built again the same way it matches (adapters registered for it are served); another seed
    does not."""
    folder = built.source.path
    again = build_random_base(SMALL, folder, device=DEVICE, seed=3, tokenizer_vocab=512)
    other = build_random_base(SMALL, folder, device=DEVICE, seed=4, tokenizer_vocab=512)
    assert again.fingerprint == built.fingerprint
    assert other.fingerprint.weights != built.fingerprint.weights
    assert other.fingerprint.tokenizer == built.fingerprint.tokenizer
    assert (folder / "config.json").is_file() and not list(folder.glob("*.safetensors"))


def test_in_place_refuses_int8(tmp_path):
    from adaptory.registry.errors import ConfigError

    with pytest.raises(ConfigError, match="4-bit or unquantized"):
        build_random_base(SMALL, tmp_path / "b", device=DEVICE, quant="int8")
