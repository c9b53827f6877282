"""Access control: loopback by default, the API key on every route but /health, admin routes
that can be switched off, no secret in any log, and `adaptory serve --help` saying all of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from serving_helpers import make_lora, register

from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.cli.main import cli
from adaptory.cli.serve_cmds import resolve_api_key
from adaptory.registry import Registry

KEY = "sk-access-9b2e51d7c0"
ADMIN = {"/v1/adapters/load", "/v1/adapters/unload"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("access")
    reg = Registry(root / "home")
    register(reg, make_lora(tiny_llama_dir, root / "a", seed=1), "lora-a", tiny_llama_dir)
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)], preload=["lora-a"])
    return reg, runtimes, root


def _routes(app) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        methods = getattr(route, "methods", None) or {"GET"}
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            found.append((method, route.path))
    return found


def test_every_route_but_health_needs_the_key(setup):
    reg, runtimes, _ = setup
    app = create_app(runtimes, registry=reg, settings=ServerSettings(api_key=KEY))
    routes = _routes(app)
    assert {path for _, path in routes} >= {
        "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify", "/health",
        "/metrics", "/openapi.json", *ADMIN,
    }  # fmt: skip
    assert any(isinstance(r, APIRoute) for r in app.routes)
    wrong = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"X-API-Key": KEY},
        {"Cookie": f"api_key={KEY}"},
    ]
    checked = 0
    with TestClient(app) as client:
        for method, path in routes:
            for headers in wrong:
                r = client.request(method, path, headers=headers, json={})
                if path == "/health":
                    assert r.status_code == 200
                    continue
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
                assert KEY not in r.text
                checked += 1
            r = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json={})
            assert r.status_code != 401, (method, path)
            assert r.status_code < 500, (method, path, r.text)
        # also unknown paths: 401 before 404, so the key guards discovery too
        assert client.get("/v1/nope").status_code == 401
        assert client.get("/docs").status_code == 401
    print(f"\nACCESS: {len(routes)} routes x {len(wrong)} wrong credentials = {checked} refusals")


def test_no_admin_hides_load_and_unload(setup):
    reg, runtimes, _ = setup
    app = create_app(runtimes, registry=reg, settings=ServerSettings(admin=False))
    with TestClient(app) as client:
        for path in ADMIN:
            r = client.post(path, json={"model": "lora-a"})
            assert r.status_code in (403, 404), (path, r.status_code)
        assert client.get("/v1/models").status_code == 200


def test_serve_help_says_loopback_key_env_and_no_admin():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for needle in ("127.0.0.1", "--api-key", "ADAPTORY_API_KEY", "--no-admin", "/health"):
        assert needle in text, needle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses of LISTEN sockets on `port` (from /proc/<pid>/net/tcp and tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        table = Path(f"/proc/{pid}/net/{name}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/net/tcp")
@pytest.mark.parametrize("given", ["env", "file"])
def test_adaptory_serve_binds_loopback_and_never_logs_the_key(setup, tmp_path, given):
    """A real `adaptory serve` with the key from ADAPTORY_API_KEY or from --api-key-file, debug
    logging (access log on): after good, bad and failing requests, the key appears in no
    output; read from a file, it is in neither the process's command line nor its environment."""
    reg, _, _ = setup
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTORY_API_KEY")}
    env["HF_HUB_OFFLINE"] = "1"
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "adaptory.cli.main", "--home", str(reg.home), "serve",
        "--preload", "lora-a", "--port", str(port), "--log-level", "debug", "--no-admin",
    ]  # fmt: skip
    if given == "env":
        env["ADAPTORY_API_KEY"] = KEY
    else:
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")  # as `echo KEY > file` writes it
        key_file.chmod(0o600)
        cmd += ["--api-key-file", str(key_file)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "adaptory serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert _listening_addresses(proc.pid, port) == {"0100007F"}  # 127.0.0.1 only
        if given == "file":
            for part in ("cmdline", "environ"):
                assert KEY.encode() not in Path(f"/proc/{proc.pid}/{part}").read_bytes(), part
        good = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/models").status_code == 401
            assert (
                client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}z"}).status_code
                == 401
            )
            assert client.get("/v1/models", headers=good).status_code == 200
            body = {"model": "lora-a", "prompt": "the cat", "max_tokens": 3}
            assert client.post("/v1/completions", json=body, headers=good).status_code == 200
            bad = {"model": KEY, "prompt": KEY}  # the key echoed back in a 404 is the client's
            assert client.post("/v1/completions", json=bad, headers=good).status_code == 404
            assert client.post(
                "/v1/adapters/load", json={"model": "lora-a"}, headers=good
            ).status_code in (403, 404)
            assert client.get(f"/v1/models?api_key={KEY[:4]}", headers=good).status_code == 200
            assert client.get("/metrics", headers=good).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text(errors="replace")
    assert "serving on http://127.0.0.1:" in text
    assert "auth on" in text
    assert "readable by other users" not in text
    assert "GET /v1/models" in text  # the access log was on: requests were logged
    assert KEY not in text and KEY[:12] not in text


# -- where the key comes from ----------------------------------------------------------------


def _key_from(tmp_path, content: bytes, mode: int = 0o600, **kwargs):
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    key_file.chmod(mode)
    warnings: list[str] = []
    key = resolve_api_key(None, key_file, warn=lambda text, **_: warnings.append(text), **kwargs)
    return key, warnings


@pytest.mark.parametrize(
    "content", [KEY.encode(), f"{KEY}\n".encode(), f"{KEY}\r\nmore\n".encode()]
)
def test_the_key_file_gives_its_first_line(tmp_path, monkeypatch, content):
    monkeypatch.delenv("ADAPTORY_API_KEY", raising=False)
    assert _key_from(tmp_path, content) == (KEY, [])


def test_a_key_file_others_can_read_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTORY_API_KEY", raising=False)
    key, warnings = _key_from(tmp_path, KEY.encode(), mode=0o644)
    assert key == KEY
    assert len(warnings) == 1 and "readable by other users (mode 0644)" in warnings[0]
    assert KEY not in warnings[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty or has surrounding spaces"),
        (b"\n" + KEY.encode(), "is empty or has surrounding spaces"),  # the key is line 1
        (b"   \n", "is empty or has surrounding spaces"),
        (f" {KEY}\n".encode(), "is empty or has surrounding spaces"),
        (b"\xff\xfe key", "cannot read it"),
    ],
)
def test_a_bad_key_file_refuses_to_start(tmp_path, monkeypatch, content, message):
    """`adaptory serve` exits 2 naming the file before it loads anything."""
    monkeypatch.delenv("ADAPTORY_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    result = CliRunner().invoke(cli, ["serve", "--api-key-file", str(key_file)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text and str(key_file) in text


def test_a_missing_key_file_and_two_keys_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTORY_API_KEY", raising=False)
    missing = tmp_path / "nope"
    result = CliRunner().invoke(cli, ["serve", "--api-key-file", str(missing)])
    assert result.exit_code == 2
    assert f"--api-key-file {missing}: cannot read it (No such file or directory)" in " ".join(
        result.output.split()
    )
    (tmp_path / "key").write_text(KEY)
    both = CliRunner().invoke(
        cli, ["serve", "--api-key", KEY, "--api-key-file", str(tmp_path / "key")]
    )
    assert both.exit_code == 2 and "both an API key" in both.output
    monkeypatch.setenv("ADAPTORY_API_KEY", KEY)
    from_env = CliRunner().invoke(cli, ["serve", "--api-key-file", str(tmp_path / "key")])
    assert from_env.exit_code == 2 and "both an API key" in from_env.output
    assert KEY not in both.output + from_env.output
