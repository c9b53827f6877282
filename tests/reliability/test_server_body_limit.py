"""`--max-body-bytes` on a real socket (uvicorn on 127.0.0.1), as docs/SERVER.md promises: a body
over the limit gets 413 `body_too_large`, by `Content-Length` before a byte of it is read, and
by counting when the body is chunked (no length to check up front)."""

from __future__ import annotations

import json
import socket

import pytest
from reliability_helpers import ThreadedServer

from adaptory.adapters.serving.server import (
    ServerSettings,
    build_runtimes,
    create_app,
    uvicorn_options,
)
from adaptory.registry import Registry

LIMIT = 1024  # the smallest limit `adaptory serve` accepts
PATH = "/v1/completions"


@pytest.fixture(scope="module")
def port(tmp_path_factory, tiny_llama_dir):
    reg = Registry(tmp_path_factory.mktemp("body-limit") / "home")
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)])
    settings = ServerSettings(max_body_bytes=LIMIT, batch_window_ms=5)
    app = create_app(runtimes, registry=reg, settings=settings)
    with ThreadedServer(app, **uvicorn_options(settings)) as url:
        yield int(url.rsplit(":", 1)[1])


def _body(tiny_llama_dir, size: int) -> bytes:
    """A valid completion request padded with JSON whitespace to exactly `size` bytes."""
    body = json.dumps({"model": f"base:{tiny_llama_dir}", "prompt": "the cat", "max_tokens": 1})
    assert len(body) <= size
    return body.encode() + b" " * (size - len(body))


def _chunked(data: bytes, piece: int = 100) -> bytes:
    out = b""
    for i in range(0, len(data), piece):
        part = data[i : i + piece]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


def _head(extra: str) -> bytes:
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one HTTP response (read by its Content-Length)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                pytest.fail(f"the server closed the connection without an answer: {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    except TimeoutError:
        pytest.fail(f"no answer within the socket's {sock.gettimeout()} s deadline: {data!r}")
    return int(lines[0].split()[1]), json.loads(rest[:length])


def _send(port: int, raw: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(raw)
        return _response(sock)


def _is_body_too_large(status: int, body: dict) -> None:
    assert status == 413, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "body_too_large"
    assert f"request body over {LIMIT} bytes" in body["error"]["message"]


@pytest.mark.parametrize("piece", [100, LIMIT + 1])
def test_a_chunked_body_one_byte_over_the_limit_gets_413(port, tiny_llama_dir, piece):
    raw = _head("Transfer-Encoding: chunked\r\n") + _chunked(
        _body(tiny_llama_dir, LIMIT + 1), piece
    )
    _is_body_too_large(*_send(port, raw))


def test_a_chunked_body_of_exactly_the_limit_is_served(port, tiny_llama_dir):
    raw = _head("Transfer-Encoding: chunked\r\n") + _chunked(_body(tiny_llama_dir, LIMIT))
    status, body = _send(port, raw)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 1


def test_a_huge_chunked_body_is_refused_without_reading_it_all(port, tiny_llama_dir):
    """10 MB announced only chunk by chunk: the answer comes while most of it is still unsent."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_head("Transfer-Encoding: chunked\r\n"))
        piece = b" " * 512
        for _ in range(4):  # 2 KiB, over the limit; the other ~10 MB are never sent
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        _is_body_too_large(*_response(sock))


def test_a_declared_length_over_the_limit_gets_413_before_the_body_is_sent(port):
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_head(f"Content-Length: {10_000_000}\r\n"))  # and not one byte of body
        _is_body_too_large(*_response(sock))


def test_a_declared_length_of_exactly_the_limit_is_served(port, tiny_llama_dir):
    body = _body(tiny_llama_dir, LIMIT)
    status, answer = _send(port, _head(f"Content-Length: {len(body)}\r\n") + body)
    assert status == 200, answer
