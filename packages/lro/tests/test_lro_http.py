"""Callbacks over real HTTP: the ASGI app on uvicorn, the WSGI app on wsgiref, HMAC and Google OIDC."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import uvicorn
from errands.core import ConfigError, TransientError
from errands.core.testing._services import free_port
from errands.lro import Config, LroClient, Operation, ResumableHandler, unmarshal_metadata
from errands.lro._auth import SIGNATURE_HEADER, sign
from google.protobuf import struct_pb2
from google.rpc import code_pb2


@dataclass
class Provisioning:
    step: int = 0
    region: str = ""


class _Uvicorn:
    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", ws="none")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Uvicorn:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _put(url: str, headers: dict[str, str] | None = None, method: str = "PUT") -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, data=b"" if method == "PUT" else None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def _drive(worker: LroClient, name: str, timeout: float = 30.0) -> int:
    """Run the local scheduler until the operation is done; returns how many callbacks it fired."""
    fired = 0
    deadline = time.monotonic() + timeout
    while not worker.get_operation_pb(name).done:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not done")
        n = worker.run_due()
        fired += n
        if n == 0:
            time.sleep(0.02)
    return fired


@pytest.fixture
def db(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'ops.db'}"


def test_seed_flow_end_to_end_over_http(db: str) -> None:
    port = free_port()
    host = f"http://127.0.0.1:{port}"
    server_client = LroClient(Config(neuron="launchpad-v1", store=db, host=host))
    worker_client = LroClient(Config(neuron="launchpad-v1", store=db, host=host, retry_delay=0.1))
    threads: list[str] = []

    def create_agent(op: Operation) -> None:
        threads.append(threading.current_thread().name)
        state = op.decode_private_state(Provisioning)
        assert state is not None
        meta = unmarshal_metadata(op, dict) or {}
        state.step += 1
        if state.step <= 2:
            op.set_private_state(state)
            op.save_metadata({**meta, "step": state.step, "region": state.region})
            op.resume_via_tasks("create-agent", delay=timedelta(milliseconds=50))
        else:
            op.complete({"agent": f"agents/{state.region}-1"})

    server_client.add_resumable_handlers(ResumableHandler("create-agent", create_agent))
    server = _Uvicorn(server_client.asgi_app(prefix="/resume-operation/"), port)
    with server:
        op = server_client.new_operation("operations/agent-1", {"step": 0}, private_state=Provisioning(region="eu"))
        op.resume_via_tasks("create-agent")
        fired = _drive(worker_client, "operations/agent-1")
    assert fired == 3 and len(threads) == 3
    assert threading.current_thread().name not in threads  # the handler ran in the server, not here
    pb = worker_client.get_operation_pb("operations/agent-1")
    assert pb.done and not pb.HasField("error")
    assert unmarshal_metadata(pb, dict) == {"step": 2, "region": "eu"}
    response = struct_pb2.Struct()
    pb.response.Unpack(response)
    assert dict(response) == {"agent": "agents/eu-1"}
    assert worker_client.get_operation("operations/agent-1").decode_private_state(Provisioning) == Provisioning(2, "eu")
    assert worker_client.scheduler.pending() == 0
    server_client.close()
    worker_client.close()


@pytest.fixture
def served(db: str) -> Iterator[tuple[LroClient, _Uvicorn]]:
    client = LroClient(Config(neuron="svc", store=db))
    calls: list[str] = []

    def handler(op: Operation) -> None:
        calls.append(op.name)
        op.complete({"ok": True})

    def flaky(op: Operation) -> None:
        raise TransientError("database warming up", retry_after=7)

    client.add_resumable_handlers(ResumableHandler("finish", handler), ResumableHandler("flaky", flaky))
    with _Uvicorn(client.asgi_app()) as server:
        yield client, server
    client.close()


def _signed(client: LroClient, target: str, secret: str | None = None) -> dict[str, str]:
    key = secret or client.callback_secret()
    assert key is not None
    return {SIGNATURE_HEADER: sign(key, "PUT", target)}


def _target(client: LroClient, name: str, path: str) -> str:
    token = client.store.get(name).resume_token
    assert token is not None
    return f"{client.config.prefix}{path}?operation={name.replace('/', '%2F')}&token={token}"


def test_unauthenticated_callback_gets_401_and_changes_nothing(served: tuple[LroClient, _Uvicorn]) -> None:
    client, server = served
    client.new_operation("operations/a").resume_via_tasks("finish", delay=3600)
    before = client.store.get("operations/a")
    target = _target(client, "operations/a", "finish")
    for headers in (
        {},
        {"authorization": "Bearer not-a-jwt"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {SIGNATURE_HEADER: "t=1,v1=00"},
        _signed(client, target, secret="another-secret-of-enough-length"),
        _signed(client, "/resume-operation/finish?operation=operations%2Fb"),  # signed for another request
    ):
        status, body, resp_headers = _put(server.url + target, headers)
        assert status == 401 and body == {"error": "unauthenticated"}
        assert resp_headers.get("www-authenticate") == "Bearer"
    assert client.store.get("operations/a") == before
    status, body, _ = _put(server.url + target, _signed(client, target))
    assert status == 200 and body == {"operation": "operations/a", "outcome": "completed"}


def test_allow_unauthenticated_is_explicit(db: str) -> None:
    client = LroClient(Config(neuron="svc", store=db, allow_unauthenticated=True))
    client.add_resumable_handlers(ResumableHandler("finish", lambda op: op.complete()))
    client.new_operation("operations/open").resume_via_tasks("finish", delay=3600)
    target = _target(client, "operations/open", "finish")
    with _Uvicorn(client.asgi_app()) as server:
        # bad credentials are refused even so
        status, _, _ = _put(server.url + target, {"authorization": "Bearer junk"})
        assert status == 401
        status, body, _ = _put(server.url + target)
        assert status == 200 and body["outcome"] == "completed"
    client.close()


def test_endpoint_answers(served: tuple[LroClient, _Uvicorn]) -> None:
    client, server = served
    client.new_operation("operations/x").resume_via_tasks("finish", delay=3600)
    token = client.store.get("operations/x").resume_token
    base = server.url

    def put(target: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        return _put(base + target, _signed(client, target))

    assert put(f"/resume-operation/nope?operation=operations%2Fx&token={token}")[0] == 404
    assert put(f"/resume-operation/finish?operation=operations%2Fmissing&token={token}")[0] == 404
    assert put("/resume-operation/finish")[0] == 400
    assert put("/resume-operation/finish?operation=operations%2Fx")[0] == 400  # no token
    assert put(f"/elsewhere/finish?operation=operations%2Fx&token={token}")[0] == 404
    status, _, headers = _put(base + f"/resume-operation/finish?operation=operations%2Fx&token={token}", method="GET")
    assert status == 405 and headers.get("allow") == "PUT"
    status, body, headers = put(f"/resume-operation/flaky?operation=operations%2Fx&token={token}")
    assert status == 503 and headers.get("retry-after") == "7" and body["error"] == "transient"
    assert not client.get_operation_pb("operations/x").done
    assert put(f"/resume-operation/finish?operation=operations%2Fx&token={token}")[1]["outcome"] == "completed"
    assert put(f"/resume-operation/finish?operation=operations%2Fx&token={token}")[1]["outcome"] == "already_done"
    op = client.new_operation("operations/y")
    op.resume_via_tasks("finish", delay=3600)
    status, body, _ = put("/resume-operation/finish?operation=operations%2Fy&token=old")
    assert status == 200 and body["outcome"] == "stale" and not client.get_operation_pb("operations/y").done


def test_handler_failure_fails_the_operation_internal_over_http(db: str) -> None:
    client = LroClient(Config(neuron="svc", store=db, allow_unauthenticated=True))

    async def broken(op: Operation) -> None:
        raise KeyError("agent")

    client.add_resumable_handlers(ResumableHandler("broken", broken))
    client.new_operation("operations/b").resume_via_tasks("broken", delay=3600)
    with _Uvicorn(client.asgi_app()) as server:
        status, body, _ = _put(server.url + _target(client, "operations/b", "broken"))
    assert status == 200 and body["outcome"] == "failed"
    pb = client.get_operation_pb("operations/b")
    assert pb.error.code == code_pb2.INTERNAL and "agent" in pb.error.message
    client.close()


def test_wsgi_app_serves_the_same_callbacks(db: str) -> None:
    client = LroClient(Config(neuron="svc", store=db, prefix="/cb/"))
    client.add_resumable_handlers(ResumableHandler("finish", lambda op: op.complete({"via": "wsgi"})))
    client.new_operation("operations/w").resume_via_tasks("finish", delay=3600)
    target = _target(client, "operations/w", "finish")

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = make_server("127.0.0.1", 0, client.wsgi_app(), handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        assert _put(base + target)[0] == 401
        assert not client.get_operation_pb("operations/w").done
        assert _put(base + "/cb/finish", _signed(client, "/cb/finish"))[0] == 400
        status, body, _ = _put(base + target, _signed(client, target))
        assert status == 200 and body == {"operation": "operations/w", "outcome": "completed"}
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert client.get_operation_pb("operations/w").done
    client.close()


# -- Google OIDC, verified for real by google-auth against certificates served here -------------------


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def make(kid: str) -> tuple[str, bytes, str]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kid)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
        )
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return kid, private, cert.public_bytes(serialization.Encoding.PEM).decode()

    google_kid, google_private, google_cert = make("google-key-1")
    _, rogue_private, _ = make("rogue-key")
    return {"kid": google_kid, "private": google_private, "certs": {google_kid: google_cert},
            "rogue": rogue_private}


def _token(private: bytes, kid: str, **claims: Any) -> str:
    from google.auth import crypt, jwt

    now = int(time.time())
    payload = {"iss": "https://accounts.google.com", "iat": now, "exp": now + 600,
               "email": "tasks@acme.iam.gserviceaccount.com", "email_verified": True, "sub": "1234"}
    payload.update(claims)
    signer = crypt.RSASigner.from_string(private, key_id=kid)
    return jwt.encode(signer, payload).decode()


def test_google_oidc_tokens_with_audience_check(db: str, httpserver: Any, signing_keys: dict[str, Any]) -> None:
    httpserver.expect_request("/oauth2/v1/certs").respond_with_json(signing_keys["certs"])
    port = free_port()
    host = f"http://127.0.0.1:{port}"
    client = LroClient(Config(
        neuron="svc", store=db, host=host, oidc_certs_url=httpserver.url_for("/oauth2/v1/certs"),
        oidc_service_accounts=("tasks@acme.iam.gserviceaccount.com",),
    ))
    client.add_resumable_handlers(ResumableHandler("finish", lambda op: op.complete({"by": "cloud-tasks"})))
    client.new_operation("operations/oidc").resume_via_tasks("finish", delay=3600)
    before = client.store.get("operations/oidc")
    server = _Uvicorn(client.asgi_app(), port)
    target = host + _target(client, "operations/oidc", "finish")
    kid, private = signing_keys["kid"], signing_keys["private"]
    with server:
        refused = {
            "wrong audience": _token(private, kid, aud="https://someone-else.example"),
            "expired": _token(private, kid, aud=host, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
            "other account": _token(private, kid, aud=host, email="intruder@evil.iam.gserviceaccount.com"),
            "unverified email": _token(private, kid, aud=host, email_verified=False),
            "other issuer": _token(private, kid, aud=host, iss="https://issuer.example"),
            "unknown key": _token(signing_keys["rogue"], "rogue-key", aud=host),
            "forged with a known kid": _token(signing_keys["rogue"], kid, aud=host),
        }
        for why, token in refused.items():
            status, body, _ = _put(target, {"authorization": f"Bearer {token}"})
            assert status == 401, why
        assert client.store.get("operations/oidc") == before
        status, body, _ = _put(target, {"authorization": f"Bearer {_token(private, kid, aud=host)}"})
    assert status == 200 and body["outcome"] == "completed"
    assert client.get_operation_pb("operations/oidc").done
    client.close()


def test_secrets_never_reach_the_logs(served: tuple[LroClient, _Uvicorn], caplog: pytest.LogCaptureFixture) -> None:
    client, server = served
    client.new_operation("operations/s").resume_via_tasks("finish", delay=3600)
    secret_token = "Bearer eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"
    with caplog.at_level("DEBUG"):
        status, _, _ = _put(server.url + _target(client, "operations/s", "finish"), {"authorization": secret_token})
    assert status == 401
    secret = client.callback_secret()
    assert secret is not None
    assert "c2VjcmV0LXBheWxvYWQ" not in caplog.text and secret not in caplog.text
    assert secret not in repr(client.callback_auth()) and secret not in repr(client.config)


# -- refused and fenced callbacks: unknown accounts, no token, replays, a second delivery meanwhile ----


# -- who may call back ---------------------------------------------------------------------------


def test_an_oidc_token_of_any_other_account_is_refused_when_no_account_is_configured(
    db: str, httpserver: Any, signing_keys: dict[str, Any]
) -> None:
    httpserver.expect_request("/oauth2/v1/certs").respond_with_json(signing_keys["certs"])
    port = free_port()
    host = f"http://127.0.0.1:{port}"
    client = LroClient(Config(neuron="svc", store=db, host=host, oidc_certs_url=httpserver.url_for("/oauth2/v1/certs")))
    client.add_resumable_handlers(ResumableHandler("finish", lambda op: op.complete()))
    client.new_operation("operations/o").resume_via_tasks("finish", delay=3600)
    target = _target(client, "operations/o", "finish")
    anyone = _token(signing_keys["private"], signing_keys["kid"], aud=host, email="anyone@gmail.com")
    with _Uvicorn(client.asgi_app(), port):
        status, _, _ = _put(host + target, {"authorization": f"Bearer {anyone}"})
    assert status == 401, "a Google-signed token of an unknown account was accepted"
    assert not client.get_operation_pb("operations/o").done
    client.close()


def test_a_callback_app_for_a_remote_scheduler_refuses_to_start_without_an_account(db: str) -> None:
    class Remote:
        def schedule(self, topic: str, payload: Any, at: Any, key: str | None = None) -> str:
            return key or ""

    client = LroClient(Config(neuron="svc", store=db, host="https://svc.example", scheduler=Remote()))
    with pytest.raises(ConfigError) as err:
        client.asgi_app()
    assert err.value.field == "lro.oidc_service_accounts"
    with pytest.raises(ConfigError):
        client.wsgi_app()
    client.close()
    # The alis default names the account from the project; an explicit one, or opting out, starts too.
    for extra in ({"project": "acme"}, {"oidc_service_accounts": ("tasks@acme.iam.gserviceaccount.com",)},
                  {"allow_unauthenticated": True}):
        with LroClient(Config(neuron="svc", store=db, host="https://svc.example", scheduler=Remote(),
                              **extra)) as ok:
            ok.asgi_app()
    assert Config(neuron="svc", project="acme").accepted_service_accounts == (
        "alis-build@acme.iam.gserviceaccount.com",
    )


# -- fencing: the token is required, spent once, and held while its handler runs -----------------


@pytest.fixture
def waiting(db: str) -> Iterator[tuple[LroClient, _Uvicorn, list[str], threading.Event, threading.Event]]:
    client = LroClient(Config(neuron="svc", store=db))
    runs: list[str] = []
    started, release = threading.Event(), threading.Event()

    def wait_once(op: Operation) -> None:
        runs.append(op.name)
        if len(runs) == 1:
            started.set()
            assert release.wait(30)
        op.save_metadata({"runs": len(runs)})  # ends without rescheduling: the operation waits for more

    client.add_resumable_handlers(ResumableHandler("wait", wait_once))
    with _Uvicorn(client.asgi_app()) as server:
        yield client, server, runs, started, release
    release.set()
    client.close()


def test_a_callback_without_its_resume_token_is_refused(
    waiting: tuple[LroClient, _Uvicorn, list[str], threading.Event, threading.Event],
) -> None:
    client, server, runs, _, release = waiting
    release.set()
    client.new_operation("operations/n").resume_via_tasks("wait", delay=3600)
    target = "/resume-operation/wait?operation=operations%2Fn"
    status, body, _ = _put(server.url + target, _signed(client, target))
    assert status == 400 and "token" in body["error"]
    assert runs == []


def test_a_replayed_callback_runs_nothing(
    waiting: tuple[LroClient, _Uvicorn, list[str], threading.Event, threading.Event],
) -> None:
    client, server, runs, _, release = waiting
    release.set()
    client.new_operation("operations/r").resume_via_tasks("wait", delay=3600)
    target = _target(client, "operations/r", "wait")
    headers = _signed(client, target)  # captured once, sent again within the signature's tolerance
    status, body, _ = _put(server.url + target, headers)
    assert status == 200 and body["outcome"] == "ran"
    status, body, _ = _put(server.url + target, headers)
    assert status == 200 and body["outcome"] == "stale"
    assert runs == ["operations/r"], "a replayed callback ran the handler again"


def test_a_second_delivery_while_the_handler_runs_is_told_to_come_back(
    waiting: tuple[LroClient, _Uvicorn, list[str], threading.Event, threading.Event],
) -> None:
    client, server, runs, started, release = waiting
    client.new_operation("operations/d").resume_via_tasks("wait", delay=3600)
    target = _target(client, "operations/d", "wait")
    first: list[tuple[int, dict[str, Any], dict[str, str]]] = []
    thread = threading.Thread(target=lambda: first.append(_put(server.url + target, _signed(client, target))))
    thread.start()
    assert started.wait(20)
    status, body, headers = _put(server.url + target, _signed(client, target))  # Cloud Tasks delivers it again
    assert status == 503 and body["error"] == "busy" and int(headers["retry-after"]) >= 1
    assert runs == ["operations/d"], "the duplicate delivery ran the handler while the first still ran"
    release.set()
    thread.join(30)
    assert first and first[0][0] == 200 and first[0][1]["outcome"] == "ran"
    status, body, _ = _put(server.url + target, _signed(client, target))  # the retry of the duplicate
    assert status == 200 and body["outcome"] == "stale" and runs == ["operations/d"]
