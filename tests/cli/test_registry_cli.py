"""The registry commands through Click's CliRunner: output, exit codes, --json and bad input."""

import json
import os
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.testing import make_lora_folder

COMMANDS = ["import", "list", "show", "tag", "untag", "rm", "verify", "gc", "export"]


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def run(home):
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(cli, ["--home", str(home), *map(str, args)], input=input)

    return invoke


@pytest.fixture
def src(tmp_path):
    return make_lora_folder(tmp_path / "src")


def listing(run):
    result = run("list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def blob_state(home):
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if "blobs" in p.parts)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_registry_command_has_help(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_import_list_show_tag_untag_rm(run, src, tmp_path):
    empty = run("list")
    assert empty.exit_code == 0 and "no adapters yet" in empty.output
    assert listing(run) == []

    first = run("import", src, "--name", "demo", "--tag", "prod", "--description", "first one")
    assert first.exit_code == 0, first.output
    assert "imported demo:1" in first.output
    second = run("import", make_lora_folder(tmp_path / "b", seed=1), "--name", "demo", "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.output)["version"] == 2

    table = run("list")
    assert table.exit_code == 0 and "demo" in table.output and "prod" in table.output
    rows = listing(run)
    assert [(r["name"], r["version"], r["tags"]) for r in rows] == [
        ("demo", 1, ["prod"]),
        ("demo", 2, []),
    ]
    for key in ("digest", "method", "task", "base_model", "metrics", "created_at", "size_bytes"):
        assert key in rows[0]
    assert rows[0]["method"] == "lora" and rows[0]["task"] == "causal-lm"

    moved = run("tag", "demo:2", "prod")
    assert moved.exit_code == 0 and "tagged demo:2 as prod" in moved.output
    shown = json.loads(run("show", "demo:prod", "--json").output)
    assert shown["version"] == 2 and shown["tags"] == ["prod"]
    assert run("untag", "demo:2", "prod").exit_code == 0
    assert [r["tags"] for r in listing(run)] == [[], []]
    assert [r["tags"] for r in json.loads(run("list", "--tag", "prod", "--json").output)] == []

    refused = run("rm", "demo:1")
    assert refused.exit_code != 0 and "--yes" in refused.output
    removed = run("rm", "demo:1", "--yes")
    assert removed.exit_code == 0 and "removed demo:1" in removed.output
    assert [r["version"] for r in listing(run)] == [2]


def test_rm_asks_for_confirmation_on_a_terminal(run, src, monkeypatch):
    run("import", src, "--name", "demo")
    monkeypatch.setattr("adaptory.cli.registry_cmds.stdin_is_interactive", lambda: True)
    kept = run("rm", "demo", input="n\n")
    assert kept.exit_code != 0 and len(listing(run)) == 1
    gone = run("rm", "demo", input="y\n")
    assert gone.exit_code == 0 and listing(run) == []


def test_show_renders_metrics_confusion_matrix_loss_and_lineage(run, home, src, tmp_path):
    reg = Registry(home)
    reg.add(src, name="parent")
    reg.add(
        make_lora_folder(tmp_path / "child", seed=3),
        name="child",
        metrics={
            "accuracy": 0.875,
            "confusion_matrix": {"labels": ["neg", "pos"], "matrix": [[7, 1], [1, 7]]},
        },
        loss_history=[3.0, 1.5, 2.0],
        training_config={"learning_rate": 0.0002},
        dataset={"rows": 16},
        parents=[{"ref": "parent:1", "weight": 1.0}, {"ref": "vanished:1"}],
    )
    result = run("show", "child")
    assert result.exit_code == 0, result.output
    for fragment in ("child:1", "accuracy", "0.875", "confusion matrix", "neg", "pos", "learning_rate",
                     "first 3, last 2, min 1.5", "parent:1", "no longer in the registry", "target_modules"):  # fmt: skip
        assert fragment in result.output, fragment
    data = json.loads(run("show", "child", "--json").output)
    assert [node["present"] for node in data["lineage"]] == [True, False]
    assert data["loss_summary"] == {"points": 3, "first": 3.0, "last": 2.0, "min": 1.5}


def test_not_found_and_bad_references(run, src):
    run("import", src, "--name", "sentiment")
    missing = run("show", "sentimnt")
    assert missing.exit_code == 3 and "sentiment" in missing.output
    bad = run("show", "a:b:c")
    assert bad.exit_code == 2 and "more than one ':'" in bad.output
    bad_tag = run("tag", "sentiment", "42")
    assert bad_tag.exit_code == 2 and "numbers are versions" in bad_tag.output


def test_verify_exits_1_naming_damaged_entries(run, home, src, tmp_path):
    run("import", src, "--name", "flipped")
    run("import", make_lora_folder(tmp_path / "b", seed=1), "--name", "truncated")
    run("import", make_lora_folder(tmp_path / "c", seed=2), "--name", "fine")
    good = run("verify")
    assert good.exit_code == 0 and "3 entries verified" in good.output

    reg = Registry(home)
    weights = reg.files("flipped") / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    config = reg.files("truncated") / "adapter_config.json"
    os.chmod(config, 0o644)
    config.write_bytes(config.read_bytes()[:-5])

    bad = run("verify")
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if "damaged" in line]
    assert len(lines) == 2
    assert "flipped:1" in lines[0] and "adapter_model.safetensors" in lines[0]
    assert "truncated:1" in lines[1] and "adapter_config.json is truncated" in lines[1]
    assert run("verify", "fine").exit_code == 0
    refused = run("export", "flipped", "--out", tmp_path / "out")
    assert refused.exit_code == 4 and "flipped:1" in refused.output
    assert not (tmp_path / "out").exists()


def test_gc_json_reports_removed_blobs(run, src):
    run("import", src, "--name", "a")
    run("rm", "a", "--yes")
    result = run("gc", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["removed_blobs"] == 1 and report["freed_bytes"] > 0
    assert "removed 0 unreferenced blob(s)" in run("gc").output


def test_export_refuses_a_non_empty_folder_without_force(run, src, tmp_path):
    run("import", src, "--name", "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = run("export", "a", "--out", out)
    assert refused.exit_code == 2 and "not empty" in refused.output and "--force" in refused.output
    forced = run("export", "a", "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()


# bad input: every case is refused with a message naming the problem, and nothing changes ----------


def write_safetensors(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _not_a_directory(f):
    (f.parent / "file.txt").write_text("x")
    return f.parent / "file.txt"


def _only_pickle_weights(f):
    (f / "adapter_model.safetensors").rename(f / "adapter_model.bin")


BAD_FOLDERS = {
    "not a directory": (_not_a_directory, "is not a directory"),
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), "not a PEFT adapter folder"),
    "invalid json": (lambda f: (f / "adapter_config.json").write_text('{"r": 4,\n  oops}'), "invalid JSON at line 2 column 3"),
    "missing peft_type": (lambda f: edit_config(f, peft_type=None), "peft_type is missing"),
    "unknown peft_type": (lambda f: edit_config(f, peft_type="SPARKLES"), "unknown peft_type 'SPARKLES'"),
    "unknown fields": (lambda f: edit_config(f, lora_sparkle=1, zeta=2), "fields unknown to LoraConfig of the installed PEFT: lora_sparkle, zeta"),
    "rank zero": (lambda f: edit_config(f, r=0), "LoRA rank r=0 is absurd"),
    "rank huge": (lambda f: edit_config(f, r=5000), "LoRA rank r=5000 is absurd"),
    "only pickle weights": (_only_pickle_weights, "adapter_model.bin is a pickle file"),
    "extra pickle file": (lambda f: (f / "optimizer.pt").write_bytes(b"x"), "optimizer.pt is a pickle file"),
    "missing safetensors": (lambda f: (f / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    "garbage header": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "header claims"),
    "truncated weights": (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:-7]), "lies outside the file"),
    "lying shape": (lambda f: write_safetensors(f / "adapter_model.safetensors", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, b"\0" * 32), "needs 64 bytes, header says 32"),
    "symlink": (lambda f: os.symlink("/etc/hostname", f / "notes.txt"), "notes.txt is a symlink"),
    "subfolder": (lambda f: (f / "checkpoint-10").mkdir(), "checkpoint-10 is a subfolder"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_adapter_folders_are_refused_and_change_nothing(run, home, src, tmp_path, case):
    assert run("import", src, "--name", "ok").exit_code == 0
    before, blobs_before = listing(run), blob_state(home)
    bad = make_lora_folder(tmp_path / "bad", seed=5)
    damage, fragment = BAD_FOLDERS[case]
    damaged = damage(bad)
    target = damaged if isinstance(damaged, Path) else bad
    result = run("import", target, "--name", "ok")
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert listing(run) == before
    assert blob_state(home) == blobs_before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--name", "a/b"], "path separator '/'"),
        (["--name", "-a"], "must start with a letter or digit"),
        (["--name", "a:b"], "contains ':'"),
        (["--name", "ok", "--tag", "3"], "tag '3' is a number; numbers are versions"),
        (["--name", "ok", "--tag", "bad tag"], "whitespace"),
    ],
)
def test_bad_names_and_tags_are_refused(run, home, src, args, fragment):
    assert run("import", src, "--name", "ok").exit_code == 0
    before = listing(run)
    result = run("import", src, *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert listing(run) == before


def test_round_trip_real_tiny_llama_import_export_gives_identical_logits(run, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "export"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    original = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora).eval()
    original.save_pretrained(adapter_dir)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = original(input_ids=ids).logits

    imported = run("import", adapter_dir, "--name", "tiny", "--tag", "prod", "--json")
    assert imported.exit_code == 0, imported.output
    entry = json.loads(imported.output)
    assert (entry["method"], entry["task"], entry["base_model"]) == (
        "lora",
        "causal-lm",
        str(base_dir),
    )
    exported = run("export", "tiny:prod", "--out", out)
    assert exported.exit_code == 0, exported.output

    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        actual = loaded(input_ids=ids).logits
    assert torch.equal(actual, expected)
    card = (out / "README.md").read_text()
    assert (
        card.startswith("---\n")
        and f'base_model: "{base_dir}"' in card
        and "library_name: peft" in card
    )


def test_list_in_a_pipe_shows_every_cell_whole(run, home, tmp_path, monkeypatch):
    """Piped or logged, `list` is not squeezed into 80 columns: no cell is cut to "accur…"."""
    monkeypatch.delenv("COLUMNS", raising=False)
    Registry(home).add(
        make_lora_folder(tmp_path / "src"),
        name="support-classifier-long-name",
        method="lora",
        task="seq-cls",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        metrics={"accuracy": 0.9833, "macro_f1": 0.98},
        tags=["production-candidate"],
    )
    result = run("list")  # CliRunner's output is not a terminal, as in a pipe
    assert result.exit_code == 0, result.output
    assert "…" not in result.output, result.output
    for cell in ("support-classifier-long-name", "sentence-transformers/all-MiniLM-L6-v2",
                 "accuracy=0.9833", "production-candidate", "seq-cls"):  # fmt: skip
        assert cell in result.output, result.output
