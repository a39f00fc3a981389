"""Access control on both protocols: an API key (no key or a wrong one -> UNAUTHENTICATED /
401, health open), and TLS with a self-signed certificate made here; over the fake engine."""

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import fakes
import grpc
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_http import HttpServed

from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc
from jdisagg.serving.access import API_KEY_ENV, Access, key_from_env
from jdisagg.serving.client import Client

ROOT = Path(__file__).resolve().parent.parent
KEY = "sekrit-key"


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1 signed by its own key: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def secured(cert):
    s = HttpServed(tokenizer=fakes.ByteTokenizer(), access=Access(KEY, *cert))
    yield s
    s.close()


def _openai(s: HttpServed, cert: str, key: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert))
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=30, http_client=http)


def _tls_channel(s: HttpServed, cert: str) -> grpc.Channel:
    roots = Path(cert).read_bytes()
    return grpc.secure_channel(f"127.0.0.1:{s.server.port}", grpc.ssl_channel_credentials(root_certificates=roots))


# ---- gRPC -----------------------------------------------------------------------------------


def test_grpc_needs_the_key_and_health_does_not(secured, cert):
    channel = _tls_channel(secured, cert[0])
    stub = pb_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[60]), sampling=pb.SamplingParameters(max_tokens=2))
    try:
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", KEY)]):
            for call in (
                lambda m=metadata: list(stub.Generate(request, metadata=m, timeout=30)),
                lambda m=metadata: stub.ModelInfo(pb.ModelInfoRequest(), metadata=m, timeout=30),
                lambda m=metadata: stub.Tokenize(pb.TokenizeRequest(text="x"), metadata=m, timeout=30),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        ok = list(stub.Generate(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=30))
        assert [t for m in ok for t in m.token_ids] == [61, 62]
        assert not [r for r in secured.submitted if r.prompt != [60]]  # refused calls never reached the engine
        assert secured.sample("jdisagg_request_errors_total", code="UNAUTHENTICATED") == 9
    finally:
        channel.close()


def test_grpc_plaintext_to_a_tls_server_fails(secured):
    with grpc.insecure_channel(f"127.0.0.1:{secured.server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_client_library_with_key_and_root_cert(secured, cert):
    target = f"127.0.0.1:{secured.server.port}"
    with Client(target, timeout=30, api_key=KEY, root_cert=cert[0]) as client:
        assert client.complete([60], max_tokens=3).token_ids == [61, 62, 63]
        assert client.model_info().model_name == "fake" and client.health() == "SERVING"
        assert list(client.tokenize("ab").token_ids) == [97, 98]
    with Client(target, timeout=30, root_cert=cert[0]) as client:
        assert client.health() == "SERVING"
        with pytest.raises(grpc.RpcError) as err:
            client.complete([60], max_tokens=3)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _client_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jdisagg.client", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env or os.environ,
    )


def test_client_cli_with_key_and_root_cert(secured, cert):
    target = ["--target", f"127.0.0.1:{secured.server.port}", "--root_cert", cert[0], "--max_tokens", "3"]
    proc = _client_cli(*target, "--api_key", KEY, "a")
    assert proc.returncode == 0 and proc.stdout == "bcd\n", proc.stderr
    proc = _client_cli(*target, "a", env=dict(os.environ, **{API_KEY_ENV: KEY}))  # the key from the environment
    assert proc.returncode == 0 and proc.stdout == "bcd\n", proc.stderr
    proc = _client_cli(*target, "a", env={k: v for k, v in os.environ.items() if k != API_KEY_ENV})
    assert proc.returncode == 1 and "UNAUTHENTICATED" in proc.stderr


# ---- HTTP -----------------------------------------------------------------------------------


def test_http_needs_the_key_and_health_does_not(secured, cert):
    secured.context = ssl.create_default_context(cafile=cert[0])
    status, body = secured.post("/v1/completions", {"prompt": "a"})  # no Authorization header
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "API key" in body["error"]["message"]
    assert secured.get("/v1/models")[0] == 401 and secured.get("/nowhere")[0] == 401
    assert secured.get("/health") == (200, {"status": "ok"})  # no key needed
    with _openai(secured, cert[0], "wrong") as client:
        with pytest.raises(openai.AuthenticationError) as err:
            client.completions.create(model="fake", prompt="a", max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with _openai(secured, cert[0], KEY) as client:
        assert client.completions.create(model="fake", prompt="a", max_tokens=2).choices[0].text == "bc"
        streamed = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "?@"
        assert [m.id for m in client.models.list().data] == ["fake"]
    assert secured.sample("jdisagg_request_errors_total", code="UNAUTHENTICATED") == 5
    assert len(secured.submitted) == 2  # refused calls never reached the engine


def test_http_plain_and_unverified_tls_fail(secured, cert):
    with pytest.raises(openai.APIConnectionError):  # the self-signed certificate is not in the system roots
        openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0, timeout=10).models.list()
    plain = secured.url.replace("https://", "http://")
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=plain + "/v1", api_key=KEY, max_retries=0, timeout=10).models.list()


def test_key_without_tls_on_both_protocols():
    s = HttpServed(access=Access(api_key=KEY))
    try:
        assert s.url.startswith("http://")
        assert s.get("/v1/models")[0] == 401
        assert s.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert s.get("/v1/models", headers={"Authorization": f"bearer {KEY}"})[0] == 200  # the scheme is any case
        assert s.get("/health")[0] == 200
        with Client(f"127.0.0.1:{s.server.port}", timeout=30, api_key=KEY) as client:
            assert client.complete([60], max_tokens=1).token_ids == [61]
    finally:
        s.close()


# ---- configuration --------------------------------------------------------------------------


def test_access_checks_its_configuration(tmp_path, cert, monkeypatch):
    with pytest.raises(ValueError, match="both a certificate"):
        Access(tls_cert=cert[0])
    with pytest.raises(FileNotFoundError, match="no TLS file"):
        Access(tls_cert=str(tmp_path / "missing.pem"), tls_key=cert[1])
    with pytest.raises(ValueError, match="empty"):
        Access(api_key=" ")
    assert Access().allows(None) and not Access(api_key=KEY).allows(None)
    assert not Access(api_key=KEY).allows(KEY) and Access(api_key=KEY).allows(f"Bearer {KEY}")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert key_from_env(None) == "from-env" and key_from_env("flag") == "flag"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert key_from_env(None) is None


def test_serve_refuses_half_a_tls_configuration(cert):
    proc = subprocess.run(
        [sys.executable, "-m", "jdisagg.serve", "--tls_cert", cert[0], "--model", "tiny-llama"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "TLS needs both a certificate" in proc.stderr
