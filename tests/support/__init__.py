"""What the tests share, one piece of code per job (fixtures: tests/conftest.py).

- `run.py`: any real client as a child process with a time bound (`run`); one-shot port443
  commands (`port443`); `wait_listening`: a child is ready once it listens.
- `curl.py`: `curl(*args) -> Reply` (status, heads, body, stderr, exit code): the one curl.
- `proxy.py`: the proxy as a child process (`start_proxy`, `ProxyProcess`): ready once the
  process itself listens on its ports; its log (`wait_log`), admin port (`admin`,
  `wait_ready`), memory; `sites_toml` and `write_config` for its configuration.
- `workers.py`: instances with `[server] workers = N`, which worker accepted a connection.
- `net.py`: free loopback ports; /proc's view of who listens and who accepted.
- `backend.py`, `h2backend.py`, `rawbackend.py`: HTTP/1.1, HTTP/2 and scripted raw upstreams
  served in the test's event loop; `h2client.py`: an HTTP/2 client that can misbehave.
- `tiny_http.py`: `serve_http(answer)`, the one small HTTP/1.1 server for doubles that answer
  whole requests: `ask.py` (on-demand TLS ask endpoint), `otlp.py` (OTLP traces receiver),
  `ari_double.py`, test_acme.py's HTTP-01 responder.
- `openssl.py`: `openssl s_client` handshakes, parsed (`handshake`, `s_client`).
- `tls.py`: TLS client connections to the proxy for tests that write their own bytes;
  `tls_server.py`: TLS servers in this process; `tls_hello.py`: real ClientHellos as bytes.
- `pebble.py`, `ari_double.py`, `certs.py`: a real Pebble ACME CA, an ARI/profiles double
  in front of it, and the proxy against them; `quick_backoff.py` runs the proxy with a
  1-second renewal backoff.
- `fuzzing.py`: hypothesis on a time budget with fixed seeds (`PORT443_FUZZ_SECONDS` for
  longer), and mutations of real protocol bytes.

The slow mark: a test that starts the proxy as a server process, Pebble, or a container image
build is marked `slow` (`pytestmark = pytest.mark.slow` for a file where every test does).
One-shot commands (`port443 check`, curl, openssl against an in-process server) are not.
`make test` runs everything; the fast in-process subset is

    .venv/bin/python -m pytest -m "not slow"

A helper that starts such a process fails an unmarked test (`slow.py`), so the subset stays
fast as tests are added.
"""
