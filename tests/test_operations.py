"""Operating a mesh: `vlmesh status`, TLS and keys on the public port through the client
library, and the end-of-turn token's text on request."""

from __future__ import annotations

import argparse

import grpc
import pytest
from meshutil import start_mesh

from services.common.certs import make_certs
from services.coordinator.auth import digest
from services.shapes import SHIPPED_MODEL

KEY = "vlm-ops-secret"
QUESTION = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("public-tls")
    make_certs(d, public_hosts=["127.0.0.1", "localhost"])
    return d


@pytest.fixture(scope="module")
def mesh(certs, tmp_path_factory):
    keys = tmp_path_factory.mktemp("ops-keys") / "keys"
    keys.write_text(f"ops sha256:{digest(KEY)}\n")
    m = start_mesh(
        SHIPPED_MODEL,
        [(0, 2), (2, 4)],
        coord_kw={"api_keys_file": str(keys), "public_tls_cert": str(certs / "public.crt"), "public_tls_key": str(certs / "public.key")},
    )
    yield m
    m.stop()


def test_the_public_port_speaks_tls_and_takes_keys(mesh, certs):
    from vlmesh import Client, Unauthenticated

    ca = (certs / "ca.crt").read_bytes()
    with Client(mesh.address, api_key=KEY, root_certificates=ca) as client:
        assert client.chat(QUESTION, max_tokens=4).text
    with Client(mesh.address, api_key="wrong", root_certificates=ca) as client, pytest.raises(Unauthenticated):
        client.chat(QUESTION, max_tokens=4)
    with grpc.insecure_channel(mesh.address) as ch:  # plaintext against a TLS port: no connection
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/vlmesh.v1.CoordinatorService/GetModelInfo")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_include_stop_token_text(mesh, certs):
    """The shapes model ends its answers with <|im_end|>: its text is left out unless asked for."""
    from vlmesh import Client

    with Client(mesh.address, api_key=KEY, root_certificates=(certs / "ca.crt").read_bytes()) as client:
        plain = client.chat(QUESTION, max_tokens=32)
        kept = client.chat(QUESTION, max_tokens=32, include_stop_token_text=True)
    assert plain.finish_reason == kept.finish_reason == "stop"
    assert plain.token_ids == kept.token_ids
    assert kept.text == plain.text + "<|im_end|>" and "<|im_end|>" not in plain.text


def test_status_prints_every_replica(mesh, certs, capsys):
    from services import status

    args = argparse.Namespace(coordinator=mesh.address, api_key=KEY, tls=True, ca_cert=str(certs / "ca.crt"), json=False)
    assert status.run(args) == 0
    out = capsys.readouterr().out
    for s in mesh.stages:
        assert s.address in out
    assert mesh.vision.address in out
    assert "0:2" in out and "2:4" in out and out.count(" up ") >= 3
    args.api_key = ""
    assert status.run(args) == 1  # without the key: refused, one line
    assert "UNAUTHENTICATED" in capsys.readouterr().err
