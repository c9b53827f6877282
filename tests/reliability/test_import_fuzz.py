"""Fuzz `import` with generated hostile adapter folders (issue #11, items 8, 9 and 14).

Each folder starts as a LoRA, prefix, prompt-tuning or IA3 adapter that fits the tiny Llama and
gets one to three mutations: config fields set to values of the wrong type, out of range or
deeply nested; the config file replaced by broken JSON; tensors retyped, poisoned with NaN or
infinity, reshaped, dropped or renamed; the safetensors header or its length prefix edited; odd
files added to the folder. For every folder:

* `Registry.add` returns an entry or raises a domain error with exit code 2, never anything else;
  a sample also goes through the real CLI, which must agree (exit 0 or 2, one `error:` line, no
  traceback);
* a refused import leaves nothing: no temp folder, no new blob, no new entry;
* a folder that imports also loads on the runtime and generates, unless the runtime refuses it
  for a reason that depends on the base or on what serving supports (a ConfigError with one of
  ALLOWED_AT_LOAD; a domain error, 4xx over HTTP). Anything else is a finding.

The generator is seeded (ADAPTORY_FUZZ_SEED, printed); case i uses Random(f"{seed}-{i}"), so a
failing case is rebuilt from its number alone. 60 cases run in the fast tier, 1,000 in the slow
one (about 20 s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.errors import AdaptoryError, ConfigError
from adaptory.registry.testing import make_lora_folder, make_prefix_folder

SEED = int(os.environ.get("ADAPTORY_FUZZ_SEED", "1107"))
CLI_EVERY = 4  # every 4th case also runs `adaptory import` through CliRunner
# The runtime's refusals at load of adapters that import: only what depends on the base they
# load onto (a task this base does not serve, modules or sizes it lacks). What no base could serve
# (IA3, prompt tuning, unsupported LoRA options, full module weights) is refused at import.
ALLOWED_AT_LOAD = (
    "adapter; this base serves",
    "the base has no module",
    "is not a Linear layer",
    "but the adapter's B·A is",
    "prefix made for",
)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # 64 x 64 in the tiny Llama

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 3, 7, 64, 2**31, 2**63, 10**40, 0.5, -0.0, 1e308, "", "x",
    "16", "LORA", "CAUSAL_LM", "SEQ_CLS", "none", "all", "\x00", "\ud800", "a" * 5000, [],
    [1], [-1, 2], ["q_proj"], [[0, 1]], [None], {}, {"q_proj": 4}, {"q_proj": "16"},
    {"q_proj": 0}, {"v_proj": 2.5}, {"(": 1}, {"a": {"b": {"c": []}}},
]  # fmt: skip
RAW_CONFIGS = [
    b"", b"{", b"[]", b"null", b'"LORA"', b'{"peft_type": "LORA"', b"\xff\xfe{}",
    "\ufeff{}".encode(), b'{"peft_type": NaN}', b'{"peft_type": "LORA", "r": 1e999}',
    b'{"peft_type": "LORA", "r": ' + b"7" * 5000 + b"}",
    b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"peft_type": "LORA", "peft_type": "IA3"}', b'{"peft_type": {"$ref": "LORA"}}',
]  # fmt: skip


def _clean(values):
    return np.clip(np.nan_to_num(values, posinf=0, neginf=0), -100, 100)


DTYPES = {  # safetensors dtype -> how float32 values become it
    "F16": lambda a: a.astype("<f2"),
    "BF16": lambda a: (a.astype("<f4").view("<u4") >> 16).astype("<u2"),
    "F64": lambda a: a.astype("<f8"),
    "I32": lambda a: (_clean(a) * 100).astype("<i4"),
    "I8": lambda a: _clean(a).astype("i1"),
    "U8": lambda a: _clean(a).astype("u1"),
    "BOOL": lambda a: a > 0,
    "F8_E4M3": lambda a: _clean(a).astype("u1"),
}


# --- starting points: adapters that fit the tiny Llama ----------------------------------------


def _prompt_folder(folder: Path, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    nvt = rng.randint(1, 5)
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": "t",
        "num_virtual_tokens": nvt, "token_dim": 64, "num_transformer_submodules": 1,
        "num_attention_heads": 4, "num_layers": 2, "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "inference_mode": True,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weight = np.random.default_rng(rng.randrange(2**32)).standard_normal((nvt, 64), "f4")
    save_file({"prompt_embeddings": weight}, str(folder / "adapter_model.safetensors"))


def _ia3_folder(folder: Path, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": "t",
        "target_modules": ["k_proj", "v_proj"], "feedforward_modules": [], "fan_in_fan_out": False,
        "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    np_rng = np.random.default_rng(rng.randrange(2**32))
    tensors = {
        f"base_model.model.model.layers.{layer}.self_attn.{module}.ia3_l": np_rng.standard_normal(
            (64, 1), "f4"
        )
        for layer in range(2)
        for module in ("k_proj", "v_proj")
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _start(folder: Path, rng: random.Random) -> str:
    kind = rng.choices(["lora", "prefix", "prompt", "ia3"], weights=[5, 3, 1, 1])[0]
    if kind == "lora":
        r = rng.choice([1, 2, 4, 8])
        modules = rng.sample(LORA_MODULES, rng.randint(1, 4))
        make_lora_folder(
            folder, r=r, hidden=64, seed=rng.randrange(1000), target_modules=modules,
            config_overrides={"lora_alpha": rng.choice([r, 2 * r, 16, 0.5])},
        )  # fmt: skip
    elif kind == "prefix":
        make_prefix_folder(folder, virtual_tokens=rng.randint(1, 6), seed=rng.randrange(1000))
    elif kind == "prompt":
        _prompt_folder(folder, rng)
    else:
        _ia3_folder(folder, rng)
    return kind


# --- mutations ---------------------------------------------------------------------------------


def _read_weights(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "adapter_model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_weights(folder: Path, header, data: bytes, *, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(raw) if length is None else length)
    (folder / "adapter_model.safetensors").write_bytes(prefix + raw + data)


def _repack(header: dict, data: bytes, convert=None) -> tuple[dict, bytes]:
    """Tensors packed again in name order (after a drop or rename), optionally converted."""
    out, packed = bytearray(), {}
    for name in sorted(k for k in header if k != "__metadata__"):
        info = dict(header[name])
        begin, end = info["data_offsets"]
        chunk = data[begin:end]
        if convert is not None:
            dtype, change = convert
            with np.errstate(all="ignore"):  # an overflow to infinity is one more hostile case
                chunk = change(np.frombuffer(chunk, _NUMPY[info["dtype"]]).astype("f4")).tobytes()
            info["dtype"] = dtype
        info["data_offsets"] = [len(out), len(out) + len(chunk)]
        packed[name] = info
        out += chunk
    if "__metadata__" in header:
        packed["__metadata__"] = header["__metadata__"]
    return packed, bytes(out)


_NUMPY = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _mutate_config(folder: Path, rng: random.Random) -> str:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    from adaptory.registry.adapter_files import _peft_config_class

    _, config_class = _peft_config_class(config["peft_type"])
    known = sorted(f.name for f in dataclasses.fields(config_class))
    action = rng.choice(["set", "set", "set", "delete", "nest"])
    if action == "delete":
        field = rng.choice(sorted(config))
        del config[field]
        what = f"config: delete {field}"
    else:
        field = rng.choice(
            rng.choices([sorted(config), known, ["unknown_field"]], weights=[6, 3, 1])[0]
        )
        depth = rng.choice([3, 30, 40, 2000, 100_000])
        value = (
            "[" * depth + "]" * depth
            if action == "nest"
            else json.dumps(rng.choice(HOSTILE_VALUES))
        )
        config[field] = "<value>"
        what = f"config: {field} = {value[:40]}"
        path.write_text(json.dumps(config).replace('"<value>"', value))
        return what
    path.write_text(json.dumps(config))
    return what


def _replace_config(folder: Path, rng: random.Random) -> str:
    raw = rng.choice(RAW_CONFIGS)
    (folder / "adapter_config.json").write_bytes(raw)
    return f"config text: {raw[:30]!r}"


def _mutate_tensors(folder: Path, rng: random.Random) -> str:
    header, data = _read_weights(folder)
    names = _tensor_names(header)
    name = rng.choice(names)
    info = header[name]
    action = rng.choice(["retype", "poison", "reshape", "drop", "rename", "scale"])
    if action == "retype" and all(header[n]["dtype"] in _NUMPY for n in names):
        dtype = rng.choice(sorted(DTYPES))
        header, data = _repack(header, data, (dtype, DTYPES[dtype]))
        what = f"tensors: all {dtype}"
    elif action == "poison" and info["dtype"] in _NUMPY:
        itemsize = np.dtype(_NUMPY[info["dtype"]]).itemsize
        begin, end = info["data_offsets"]
        at = begin + itemsize * rng.randrange((end - begin) // itemsize)
        value = np.array([rng.choice([np.nan, np.inf, -np.inf])], _NUMPY[info["dtype"]])
        data = data[:at] + value.tobytes() + data[at + itemsize :]
        what = f"tensors: {value[0]} in {name}"
    elif action == "reshape":
        count = int(np.prod(info["shape"]))
        shapes = [[count], [1, count], [count, 1], list(reversed(info["shape"])), [0, 10**18]]
        shapes += [[rng.randint(0, 70), rng.randint(0, 70)], [2, count // 2, 1]]
        info["shape"] = rng.choice(shapes)
        what = f"tensors: {name} shape {info['shape']}"
    elif action == "drop" and len(names) > 1:
        del header[name]
        header, data = _repack(header, data)
        what = f"tensors: drop {name}"
    elif action == "rename":
        new = rng.choice(
            [
                name.replace("lora_A", "lora_B"), name.replace("q_proj", "no_such_proj"),
                name.replace("self_attn.q_proj", "mlp.up_proj"), name + ".extra", "",
                "base_model.model.lm_head.weight", name.replace(".weight", ""), "__metadata__x",
                name.replace("lora_A", "lora_magnitude_vector"),
            ]
        )  # fmt: skip
        header[new] = header.pop(name)
        header, data = _repack(header, data)
        what = f"tensors: rename {name} -> {new!r}"
    elif action == "scale" and info["dtype"] == "F32":
        begin, end = info["data_offsets"]
        with np.errstate(all="ignore"):  # values overflowing to infinity are hostile too
            scaled = np.frombuffer(data[begin:end], "<f4") * np.float32(rng.choice([1e-30, 1e30]))
        data = data[:begin] + scaled.astype("<f4").tobytes() + data[end:]
        what = f"tensors: scale {name}"
    else:
        return _mutate_header(folder, rng)
    _write_weights(folder, header, data)
    return what


def _mutate_header(folder: Path, rng: random.Random) -> str:
    header, data = _read_weights(folder)
    name = rng.choice(_tensor_names(header))
    action = rng.choice(["field", "field", "metadata", "whole", "length", "truncate", "append"])
    length = None
    if action == "field":
        key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        value = rng.choice(HOSTILE_VALUES + ["F32", "Q9", [0, 8], [2**64, 2**64], [3, 0]])
        header[name][key] = value
        what = f"header: {name}.{key} = {json.dumps(value)[:40]}"
    elif action == "metadata":
        value = rng.choice(HOSTILE_VALUES + [{"format": "pt"}, {"format": 1}, {"a": ["b"]}])
        header["__metadata__"] = value
        what = f"header: __metadata__ = {json.dumps(value)[:40]}"
    elif action == "whole":
        header = rng.choice(
            [
                b"[]", b"null", b"{}", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                b"{" + b",".join(b'"t%d":{}' % i for i in range(100_002)) + b"}",
                json.dumps(header).encode() + b" " * (16 * 2**20), b"\xff" * 8,
            ]
        )  # fmt: skip
        what = f"header: replaced ({len(header)} bytes)"
    elif action == "length":
        raw_length = len(json.dumps(header).encode())
        length = rng.choice([0, 1, raw_length - 1, raw_length + 1, 2**63, 2**64 - 1])
        what = f"header: length prefix {length}"
    elif action == "truncate":
        data = data[: rng.randrange(len(data))]
        what = "header: data truncated"
    else:
        data += b"\0" * rng.randint(1, 64)
        what = "header: bytes appended"
    _write_weights(folder, header, data, length=length)
    return what


def _mutate_folder(folder: Path, rng: random.Random) -> str:
    action = rng.choice(["bad-name", "subfolder", "symlink", "pickle", "fifo", "readme", "remove"])
    tag = rng.randrange(10**6)  # a fresh name: this may run twice on one folder
    if action == "bad-name":
        os.close(os.open(os.fsencode(folder) + b"/n\xe9-%d.txt" % tag, os.O_CREAT | os.O_WRONLY))
    elif action == "subfolder":
        (folder / f"checkpoint-{tag}").mkdir()
    elif action == "symlink":
        (folder / f"link-{tag}.json").symlink_to(folder / "adapter_config.json")
    elif action == "pickle":
        (folder / f"adapter_model-{tag}.bin").write_bytes(b"\x80\x04N.")
    elif action == "fifo":
        os.mkfifo(folder / f"pipe-{tag}")
    elif action == "readme":
        (folder / "README.md").write_text("# notes\n")
    else:
        (folder / rng.choice(["adapter_config.json", "adapter_model.safetensors"])).unlink()
    return f"folder: {action}"


def _vary(folder: Path, rng: random.Random) -> str:
    """A change real adapters have (so that enough cases import, load and serve)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    lora = config["peft_type"] == "LORA"
    changes = [
        ("revision", "main"), ("inference_mode", False), ("base_model_name_or_path", "x/y"),
        ("task_type", None), ("peft_version", "0.13.0"), ("modules_to_save", None),
    ]  # fmt: skip
    if lora:
        changes += [
            ("lora_alpha", rng.choice([0.5, 3, 32.0])), ("use_rslora", True),
            ("alpha_pattern", {"v_proj": 2.5}), ("rank_pattern", {"no_such_module": 2}),
            ("lora_dropout", 0.1), ("init_lora_weights", "gaussian"),
        ]  # fmt: skip
    if config["peft_type"] == "PREFIX_TUNING":
        changes += [("prefix_projection", True), ("encoder_hidden_size", 128)]
    action = rng.choice(["config", "config", "dtype", "metadata"])
    if action == "config":
        field, value = rng.choice(changes)
        config[field] = value
        path.write_text(json.dumps(config))
        return f"vary: {field} = {json.dumps(value)}"
    header, data = _read_weights(folder)
    if action == "metadata":
        header["__metadata__"] = {"format": "pt", "note": rng.choice(["", "x", "\u00e9"])}
        _write_weights(folder, header, data)
        return "vary: metadata"
    dtype = rng.choice(["F16", "BF16", "F64"])
    _write_weights(folder, *_repack(header, data, (dtype, DTYPES[dtype])))
    return f"vary: all {dtype}"


MUTATIONS = [
    (_mutate_config, 5), (_replace_config, 1), (_mutate_tensors, 5), (_mutate_header, 3),
    (_mutate_folder, 1), (_vary, 6),
]  # fmt: skip


def make_case(folder: Path, seed: int, index: int) -> list[str]:
    """Build hostile folder number `index`; returns what was done to it."""
    rng = random.Random(f"{seed}-{index}")
    steps = [_start(folder, rng)]
    functions, weights = zip(*MUTATIONS, strict=True)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if not (folder / "adapter_config.json").exists():
            break
        if not (folder / "adapter_model.safetensors").exists():
            break
        mutate = rng.choices(functions, weights=weights)[0]
        try:
            steps.append(mutate(folder, rng))
        except (ValueError, LookupError, TypeError, RecursionError, struct.error):
            # an earlier step broke the file this one edits
            steps.append(_mutate_folder(folder, rng))
    return steps


# --- the run -----------------------------------------------------------------------------------


def _blobs(home: Path) -> set[str]:
    objects = home / "blobs" / "sha256"
    return {p.name for p in objects.iterdir()} if objects.is_dir() else set()


def _temp(home: Path) -> list[str]:
    tmp = home / "blobs" / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def run_fuzz(count: int, tmp_path: Path, tiny_llama_dir: Path) -> Counter:
    from adaptory.adapters.serving.runtime import GenerationRequest, Runtime

    print(f"import fuzz: seed {SEED}, {count} cases (ADAPTORY_FUZZ_SEED={SEED} to replay)")
    home = tmp_path / "home"
    reg = Registry(home)
    runtime = Runtime(str(tiny_llama_dir), registry=reg, max_adapters=2)
    findings: list[str] = []
    tally: Counter = Counter()
    for index in range(count):
        folder = tmp_path / "cases" / f"{index:04d}"
        steps = make_case(folder, SEED, index)
        case = f"case {index} ({'; '.join(steps)})"
        blobs, entries = _blobs(home), len(reg.list())
        try:
            entry = reg.add(folder, name=f"case-{index}", servable=True)  # as `import` does
        except AdaptoryError as exc:
            entry = None
            tally["refused at import"] += 1
            if exc.exit_code != 2 or "\n" in exc.message:
                findings.append(f"{case}: refusal {type(exc).__name__} {exc.message!r}")
        except Exception as exc:  # the finding this test exists for
            findings.append(f"{case}: import raised {type(exc).__name__}: {exc}"[:400])
            continue

        if index % CLI_EVERY == 0:
            result = CliRunner().invoke(
                cli, ["--home", str(home), "import", str(folder), "--name", f"cli-{index}"]
            )
            expected = 0 if entry is not None else 2
            first = result.output.splitlines()[0] if result.output else ""
            if (
                result.exit_code != expected
                or "Traceback" in result.output
                or (expected == 2 and not first.startswith("error:"))
            ):
                findings.append(f"{case}: CLI exit {result.exit_code}: {result.output[-300:]!r}")

        if entry is None:
            if _temp(home) or _blobs(home) != blobs or len(reg.list()) != entries:
                findings.append(f"{case}: a refused import left {_temp(home)} or a blob or a row")
            continue
        try:
            runtime.load(entry)
        except ConfigError as exc:
            reason = next((r for r in ALLOWED_AT_LOAD if r in exc.message), None)
            if reason is None:
                findings.append(f"{case}: imported but failed to load: {exc.message}")
            tally[f"imported, refused at load: {reason}"] += 1
            if entry.ref in runtime.resident() or entry.ref in runtime._bank.slots:
                findings.append(f"{case}: a failed load left {entry.ref} resident")
            continue
        except Exception as exc:
            findings.append(f"{case}: imported but load raised {type(exc).__name__}: {exc}"[:400])
            continue
        try:
            request = GenerationRequest(prompt="the cat", adapter=entry.ref, max_new_tokens=2)
            runtime.generate([request])
            tally["imported, loaded and generated"] += 1
        except AdaptoryError as exc:  # e.g. finite but huge weights: non-finite logits
            tally[f"imported and loaded, generation refused: {type(exc).__name__}"] += 1
        except Exception as exc:
            findings.append(f"{case}: generation raised {type(exc).__name__}: {exc}"[:400])
        runtime.unload(entry.ref)
    print("\n".join(f"  {n:5d}  {what}" for what, n in sorted(tally.items())))
    assert not findings, f"seed {SEED}: {len(findings)} findings:\n" + "\n".join(findings)
    return tally


def test_import_fuzz_sample_never_crashes_leaves_nothing_and_what_imports_loads(
    tmp_path, tiny_llama_dir
):
    tally = run_fuzz(60, tmp_path, tiny_llama_dir)
    # the sample exercises both sides: refusals and adapters that load and generate
    assert tally["refused at import"] >= 20 and tally["imported, loaded and generated"] >= 5


@pytest.mark.slow
def test_import_fuzz_1000_cases(tmp_path, tiny_llama_dir):
    tally = run_fuzz(1000, tmp_path, tiny_llama_dir)
    assert tally["refused at import"] >= 300 and tally["imported, loaded and generated"] >= 100
