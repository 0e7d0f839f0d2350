"""TLS, mutual TLS and the shared token: who is refused, and that health probes stay open."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ormo_ps.common.grpc_options import GRPC_MESSAGE_OPTIONS
from ormo_ps.server.config import RunConfig
from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.common.security import ClientSecurity, ServerSecurity, is_loopback, warn_if_exposed

RUN = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=1_000_000)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str | None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    _leaf(d, "client", "ca", None)
    _leaf(d, "rogue-client", "rogue-ca", None)
    return d


def status(target: str, security: ClientSecurity, timeout: float = 5.0) -> pb.Status:
    with security.channel(target, GRPC_MESSAGE_OPTIONS) as ch:
        return pb_grpc.ParameterServerStub(ch).GetStatus(pb.GetStatusRequest(), timeout=timeout,
                                                         metadata=security.call_metadata())


def health(target: str, security: ClientSecurity) -> int:
    with security.channel(target, GRPC_MESSAGE_OPTIONS) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def refused(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def test_token_is_checked_on_every_call_but_health(start_live_server):
    live, stop = start_live_server(RUN, bind="127.0.0.1:0", linger=0.0, grace=1.0,
                                   security=ServerSecurity(token="s3cret-token"))
    try:
        t = live.target
        assert status(t, ClientSecurity(token="s3cret-token")).iteration == 0
        assert refused(lambda: status(t, ClientSecurity())) == grpc.StatusCode.UNAUTHENTICATED
        assert refused(lambda: status(t, ClientSecurity(token="wrong"))) == grpc.StatusCode.UNAUTHENTICATED
        assert refused(lambda: status(t, ClientSecurity(token="s3cret-token-longer"))) == \
            grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(t, options=GRPC_MESSAGE_OPTIONS) as ch:  # the training stream too
            call = pb_grpc.ParameterServerStub(ch).Train(
                iter([pb.WorkerMessage(register=pb.Register(name="intruder"))]), timeout=5)
            assert refused(lambda: list(call)) == grpc.StatusCode.UNAUTHENTICATED
        assert health(t, ClientSecurity()) == health_pb2.HealthCheckResponse.SERVING
        assert live.on_loop(lambda: len(live.service.connections)) == 0
    finally:
        stop()


def test_token_from_a_file(start_live_server, tmp_path):
    (tmp_path / "token").write_text("from-a-file\n")
    live, stop = start_live_server(RUN, bind="127.0.0.1:0", linger=0.0, grace=1.0,
                                   security=ServerSecurity(token_file=str(tmp_path / "token")))
    try:
        assert status(live.target, ClientSecurity(token_file=str(tmp_path / "token"))).iteration == 0
        assert refused(lambda: status(live.target, ClientSecurity(token="from-a-fil"))) == \
            grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop()


def test_tls_server_refuses_plaintext_and_untrusted_clients(start_live_server, pki):
    security = ServerSecurity(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    live, stop = start_live_server(RUN, bind="127.0.0.1:0", linger=0.0, grace=1.0, security=security)
    try:
        t = live.target
        assert status(t, ClientSecurity(tls_ca=str(pki / "ca.pem"))).iteration == 0
        assert refused(lambda: status(t, ClientSecurity(), timeout=3)) == grpc.StatusCode.UNAVAILABLE
        assert refused(lambda: status(t, ClientSecurity(tls_ca=str(pki / "rogue-ca.pem")), timeout=3)) == \
            grpc.StatusCode.UNAVAILABLE
        assert health(t, ClientSecurity(tls_ca=str(pki / "ca.pem"))) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop()


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(start_live_server, pki):
    security = ServerSecurity(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                              tls_client_ca=str(pki / "ca.pem"))
    live, stop = start_live_server(RUN, bind="127.0.0.1:0", linger=0.0, grace=1.0, security=security)
    try:
        t = live.target
        ca = str(pki / "ca.pem")
        good = ClientSecurity(tls_ca=ca, tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
        assert status(t, good).iteration == 0
        assert refused(lambda: status(t, ClientSecurity(tls_ca=ca), timeout=3)) == grpc.StatusCode.UNAVAILABLE
        rogue = ClientSecurity(tls_ca=ca, tls_cert=str(pki / "rogue-client.pem"),
                               tls_key=str(pki / "rogue-client.key"))
        assert refused(lambda: status(t, rogue, timeout=3)) == grpc.StatusCode.UNAVAILABLE
    finally:
        stop()


def test_plaintext_on_another_address_is_warned_about(caplog):
    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("10.0.0.1:5")
    with caplog.at_level(logging.WARNING, logger="ormo_ps.common.security"):
        warn_if_exposed("127.0.0.1:50051", ServerSecurity())
        assert not caplog.records
        warn_if_exposed("0.0.0.0:50051", ServerSecurity(token="t"))
        assert not caplog.records
        warn_if_exposed("0.0.0.0:50051", ServerSecurity())
    assert "without TLS or a token" in caplog.text


def test_bad_security_flags_are_clear_errors():
    with pytest.raises(ValueError, match="together"):
        ServerSecurity(tls_cert="a.pem")
    with pytest.raises(ValueError, match="needs tls_cert"):
        ServerSecurity(tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="needs tls_ca"):
        ClientSecurity(tls_cert="c.pem", tls_key="c.key")
    with pytest.raises(ValueError, match="cannot read TLS key /nonexistent.key"):
        ServerSecurity(tls_cert="/nonexistent.pem", tls_key="/nonexistent.key").credentials()


@pytest.mark.slow
def test_a_real_worker_trains_over_mutual_tls_with_a_token(start_live_server, pki, tmp_path):
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=40)
    security = ServerSecurity(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                              tls_client_ca=str(pki / "ca.pem"), token="tok")
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=30.0, grace=1.0, security=security)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PS_TOKEN": "tok"}
        worker = subprocess.run(
            [sys.executable, "-m", "ormo_ps.worker.cli", "--server", live.target, "--threads", "1", "--tls-ca",
             str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")],
            env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr[-2000:]
        assert '"stop_reason": "STOP_REASON_DONE"' in worker.stdout
        assert live.on_loop(lambda: live.service.core.iteration) == 40
    finally:
        stop()


@pytest.mark.slow
def test_a_worker_names_the_cause_of_a_tls_mismatch(start_live_server, pki):
    """A wrong CA, plaintext against TLS and TLS against plaintext: the worker says which (issue #11, item 8),
    not only "server unreachable (UNAVAILABLE)", and gives up with one line after --server-timeout."""
    run = RunConfig(algo="ormo", workers=1, dataset="digits", model="mlp", batch_size=32, iterations=40)
    tls = ServerSecurity(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}

    def worker(target: str, *flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "ormo_ps.worker.cli", "--server", target, "--server-timeout", "2",
                               *flags], env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        return done.stderr

    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0, security=tls)
    try:
        assert "not signed by --tls-ca" in worker(live.target, "--tls-ca", str(pki / "rogue-ca.pem"))
        assert "does the server expect TLS" in worker(live.target)
    finally:
        stop()
    live, stop = start_live_server(run, bind="127.0.0.1:0", linger=0.0, grace=1.0)
    try:
        assert "does the server use TLS" in worker(live.target, "--tls-ca", str(pki / "ca.pem"))
    finally:
        stop()
