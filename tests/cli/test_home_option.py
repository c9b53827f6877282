"""A base made under --home is found by every command that loads a base, even when
ADAPTORY_HOME points elsewhere (the demo's situation: merge once looked in the default home)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from adaptory.cli.main import cli


def test_every_base_loading_command_uses_the_home_option(tmp_path, test_corpus, adaptory_home):
    home = tmp_path / "elsewhere"
    assert home != adaptory_home
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Shout: the cat {w}\nAnswer:", "completion": f" THE CAT {w.upper()}"}
            for w in ("sat", "ran", "ate", "hid", "sang", "slept")]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*args):
        result = CliRunner().invoke(cli, ["--home", str(home), *args])
        assert result.exit_code == 0, result.output
        return result.output

    run("base", "init", "mine", "--corpus", str(test_corpus))
    for name, seed in (("a", "0"), ("b", "1")):
        run("train", "--base", "mine", "--data", str(data), "--name", name, "--max-steps", "2",
            "--eval-split", "0", "--seed", seed, "--json")  # fmt: skip
    run("merge", "a", "b", "--name", "ab", "--method", "cat", "--no-eval")
    run("eval", "ab", "--data", str(data))
    out = json.loads(run("generate", "ab", "Shout: the cat\nAnswer:", "--max-new-tokens", "3",
                         "--json"))  # fmt: skip
    assert out["model"] == "ab:1" and 1 <= out["usage"]["completion_tokens"] <= 3
    run("export", "ab", "--format", "vllm", "--out", str(tmp_path / "vllm"))
    assert not (adaptory_home / "catalog.db").exists()  # nothing went to ADAPTORY_HOME
