"""Mutation testing with cosmic-ray, module by module (`make mutation`; not part of CI).

The modules, the tests each mutant runs and the operators left out live in pyproject.toml under
[tool.adaptory.mutation]; cosmic-ray reads only its own TOML, so this script writes one config per
module. cosmic-ray mutates files in place, so the run works on a copy of the tree, imported
through a PYTHONPATH folder whose `adaptory/` links to the copy (the editable install maps
`adaptory.adapters` to ./adapters and would otherwise import the unmutated files).

    python tests/mutation/run.py                          # every configured module
    python tests/mutation/run.py registry/refs.py         # one module
    python tests/mutation/run.py --resume registry/refs.py   # finish an interrupted session
    python tests/mutation/run.py --retest-survivors registry/refs.py  # after adding tests
    python tests/mutation/run.py --workers 2 adapters/serving/lora_bank.py  # one per core

With `--workers N` above 1, cosmic-ray's http distributor hands the mutants to N local
`cosmic-ray http-worker` processes, each on its own copy of the tree (a worker mutates the
files it runs in).

A module's `quick` tests (a subset of its `tests`) run first; only the mutants they leave alive
run the whole list. Prints per module killed / survived / score and every surviving mutant's diff; docs/TESTING.md
says which survivors are equivalent mutants.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"adapters": "adapters", "registry": "registry", "cli": "cli"}  # adaptory.X -> ./X


def load_settings() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["adaptory"]["mutation"]


def copy_tree(run: Path) -> Path:
    """A copy of the tracked and untracked-not-ignored files of the working tree, and the
    PYTHONPATH folder (`run/importroot`) through which the tests import it."""
    tree = run / "tree"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if not src.is_file():
            continue
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    shim = run / "importroot" / "adaptory"
    shim.mkdir(parents=True)
    for name, folder in PACKAGES.items():
        (shim / name).symlink_to(tree / folder, target_is_directory=True)
    return tree


def tree_env(run: Path, **extra: str) -> dict:
    """The environment that imports `adaptory` from the copy under `run` (see copy_tree)."""
    env = {**os.environ, "PYTHONPATH": str(run / "importroot"), **extra}
    env.pop("ADAPTORY_HOME", None)
    return env


def line_ranges(source: str, module: dict) -> list[str]:
    """Line ranges to mutate: whole functions named in `functions`, and `spans` (pairs of
    regular expressions: from the first line matching the first to the next matching the
    second). Empty means the whole module."""
    ranges = []
    tree = ast.parse(source)
    wanted = set(module.get("functions", ()))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in wanted:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            ranges.append(f"{first}-{node.end_lineno}")
            found.add(node.name)
    if wanted - found:
        sys.exit(f"mutation: functions not found in {module['path']}: {sorted(wanted - found)}")
    lines = source.splitlines()
    for start_re, end_re in module.get("spans", ()):
        start = next((i for i, s in enumerate(lines) if re.search(start_re, s)), None)
        if start is None:
            sys.exit(f"mutation: no line of {module['path']} matches {start_re!r}")
        end = next((i for i in range(start, len(lines)) if re.search(end_re, lines[i])), None)
        if end is None:
            sys.exit(f"mutation: no line of {module['path']} after {start_re!r} matches {end_re!r}")
        ranges.append(f"{start + 1}-{end + 1}")
    return ranges


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(
    work: Path,
    tree: Path,
    settings: dict,
    module: dict,
    *,
    quick: bool = False,
    worker_urls: list[str] = (),
) -> tuple[Path, bool]:
    """cosmic-ray's config for `module`: its `tests`, or with `quick` only its `quick` tests;
    run in place (the `local` distributor) or, given `worker_urls`, by those http workers."""
    path = module["path"]
    chosen = module["quick"] if quick else module["tests"]
    tests = " ".join(shlex.quote(t) for t in chosen)
    marker = shlex.quote(settings.get("markers", "not slow and not soak"))
    command = (
        f"{shlex.quote(sys.executable)} -m pytest -x -q -p no:cacheprovider -p no:randomly "
        f"-m {marker} {tests}"
    )
    ranges = line_ranges((tree / path).read_text(), module)
    excluded = settings.get("exclude-operators", [])
    text = "\n".join(
        [
            "[cosmic-ray]",
            f"module-path = {toml_str(path)}",
            f"timeout = {float(module.get('timeout', settings.get('timeout', 300)))}",
            "excluded-modules = []",
            f"test-command = {toml_str(command)}",
            "",
            "[cosmic-ray.distributor]",
            f'name = "{"http" if worker_urls else "local"}"',
            "",
            "[cosmic-ray.distributor.http]",
            f"worker-urls = [{', '.join(toml_str(u) for u in worker_urls)}]",
            "",
            "[cosmic-ray.filters.operators-filter]",
            f"exclude-operators = [{', '.join(toml_str(e) for e in excluded)}]",
            "",
            "[cosmic-ray.filters.line-filter.lines]",
            f"{toml_str(path)} = [{', '.join(toml_str(r) for r in ranges)}]" if ranges else "",
            "",
        ]
    )
    cfg = work / (
        path.replace("/", "_").removesuffix(".py") + ("-quick" if quick else "") + ".toml"
    )
    cfg.write_text(text)
    return cfg, bool(ranges)


def cr(tool: str, *args: str, tree: Path, env: dict, check: bool = True):
    exe = Path(sys.executable).parent / tool
    return subprocess.run([str(exe), *args], cwd=tree, env=env, check=check, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_workers(run: Path, count: int):
    """`count` cosmic-ray http workers, each on its own copy of the tree; yields their URLs."""
    exe = Path(sys.executable).parent / "cosmic-ray"
    workers = []  # (process, its log, its port)
    try:
        for i in range(count):
            own = run / f"worker{i}"
            tree = copy_tree(own)
            (own / "tmp").mkdir()
            # pytest's own temp root per worker: concurrent runs would prune each other's
            env = tree_env(own, PYTEST_DEBUG_TEMPROOT=str(own / "tmp"))
            port = free_port()
            log = open(own / "worker.log", "w")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(
                [str(exe), "http-worker", "--port", str(port)],
                cwd=tree,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            workers.append((proc, log, port))
        for proc, _, port in workers:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    sys.exit(f"mutation: the http worker on port {port} exited ({proc.returncode})")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        sys.exit(f"mutation: the http worker on port {port} did not start in 60 s")
                    time.sleep(0.2)
        yield [f"http://127.0.0.1:{port}" for _, _, port in workers]
    finally:
        for proc, log, _ in workers:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def results(session: Path, tree: Path, env: dict) -> list[dict]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "cosmic-ray"), "dump", str(session)],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def forget_survivors(session: Path) -> None:
    """Drop the results of surviving mutants so that `cosmic-ray exec` runs them again; killed
    ones stay killed (more tests cannot make a failing run pass)."""
    with sqlite3.connect(session) as conn:
        conn.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")


def summarize(path: str, rows: list[dict]) -> tuple[int, int]:
    killed = survived = other = 0
    survivors = []
    for item, result in rows:
        if result is None:
            other += 1
            continue
        if result["worker_outcome"] == "skipped":
            continue
        if result["worker_outcome"] != "normal":
            other += 1
            survivors.append((item, result))  # an exception in the worker: look at it
        elif result["test_outcome"] == "killed":
            killed += 1
        else:
            survived += 1
            survivors.append((item, result))
    for item, result in sorted(survivors, key=lambda s: s[0]["mutations"][0]["start_pos"]):
        m = item["mutations"][0]
        print(f"\n--- survived: {path}:{m['start_pos'][0]} {m['operator_name']} "
              f"(occurrence {m['occurrence']}, job {item['job_id']}, "
              f"{result['worker_outcome']})")  # fmt: skip
        print(result.get("diff") or result.get("output") or "")
    total = killed + survived
    score = f"{100 * killed / total:.1f}%" if total else "n/a"
    print(f"\n{path}: {killed} killed, {survived} survived, {other} not run; "
          f"score {killed}/{total} = {score}")  # fmt: skip
    return killed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module paths (default: all configured)")
    parser.add_argument("--work", default=str(REPO / "build" / "mutation"), help="work folder")
    parser.add_argument("--resume", action="store_true", help="keep the sessions, run what is left")
    parser.add_argument(
        "--retest-survivors",
        action="store_true",
        help="run the surviving mutants of the stored sessions again (after new tests)",
    )
    parser.add_argument("--report", action="store_true", help="only print the stored results")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="mutants run at once, each by an http worker on its own copy of the tree",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    settings = load_settings()
    configured = {m["path"]: m for m in settings["modules"]}
    chosen = args.modules or list(configured)
    unknown = [m for m in chosen if m not in configured]
    if unknown:
        sys.exit(
            f"mutation: not configured in pyproject.toml: {unknown}; known: {list(configured)}"
        )

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=work) as run:
        tree = copy_tree(Path(run))
        env = tree_env(Path(run))
        if args.workers > 1 and not args.report:
            with http_workers(Path(run), args.workers) as urls:
                run_modules(args, settings, configured, chosen, work, tree, env, urls)
        else:
            run_modules(args, settings, configured, chosen, work, tree, env, [])


def run_modules(
    args, settings, configured, chosen, work: Path, tree: Path, env: dict, urls: list[str]
) -> None:
    totals = [0, 0]
    for path in chosen:
        session = work / (path.replace("/", "_").removesuffix(".py") + ".sqlite")
        if not args.report:
            cfg, by_lines = write_config(work, tree, settings, configured[path], worker_urls=urls)
            if args.retest_survivors and session.exists():
                forget_survivors(session)
            elif not (args.resume and session.exists()):
                print(f"== {path}: baseline", flush=True)
                cr("cosmic-ray", "baseline", str(cfg), tree=tree, env=env)
                # a fresh run starts over: init refuses a session file that holds results
                cr("cosmic-ray", "init", "--force", str(cfg), str(session), tree=tree, env=env)
                cr("cr-filter-operators", str(session), str(cfg), tree=tree, env=env)
                if by_lines:  # without ranges cr-filter-lines would skip every mutant
                    cr("cr-filter-lines", "--config", str(cfg), str(session), tree=tree, env=env)
            module = configured[path]
            if module.get("quick") and not args.retest_survivors:
                # a mutant the quick tests kill is killed by the full list too (it holds them);
                # only the survivors of this pass need the slow tests
                quick_cfg, _ = write_config(
                    work, tree, settings, module, quick=True, worker_urls=urls
                )
                print(f"== {path}: mutants, quick tests", flush=True)
                cr("cosmic-ray", "exec", str(quick_cfg), str(session), tree=tree, env=env)
                forget_survivors(session)
            print(f"== {path}: mutants", flush=True)
            cr("cosmic-ray", "exec", str(cfg), str(session), tree=tree, env=env)
        killed, total = summarize(path, results(session, tree, env))
        totals[0] += killed
        totals[1] += total
    if len(chosen) > 1 and totals[1]:
        print(f"\nall: {totals[0]}/{totals[1]} = {100 * totals[0] / totals[1]:.1f}% killed")


if __name__ == "__main__":
    main()
