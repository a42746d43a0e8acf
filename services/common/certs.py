"""`vlmesh certs`: a certificate authority for one mesh and a certificate per service.

    vlmesh certs --out DIR [--public-host api.example.com ...] [--days 365]

DIR gets ca.crt (give it to every service: --mesh-ca), ca.key (keep it offline: it makes new
certificates), for each of coordinator, stage, vision a NAME.crt and NAME.key (--mesh-cert,
--mesh-key), and tls.crt / tls.key, one certificate every service may share (what the
Kubernetes Secret `vlmesh-mesh-tls` holds). Every mesh certificate names the DNS name the mesh's clients check
(services.common.tls.MESH_SERVER_NAME), so replicas are reachable at any address. With
--public-host, public.crt / public.key are a server certificate for the coordinator's public
port (--public-tls-cert / --public-tls-key); a real deployment would rather use one from its own
CA there. ECDSA P-256 keys, SHA-256 signatures."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from .tls import MESH_SERVER_NAME

SERVICES = ("coordinator", "stage", "vision")


@dataclass(frozen=True)
class MeshCertFiles:
    ca: Path
    cert: Path
    key: Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def make_certs(out: str | Path, public_hosts: list[str] = (), days: int = 365) -> dict[str, MeshCertFiles]:  # type: ignore[assignment]
    """Write the CA and the certificates; returns each service's files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vlmesh mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "ca.crt", _pem_cert(ca))
    _write(out / "ca.key", _pem_key(ca_key), secret=True)

    def issue(name: str, dns: list[str], ips: list[str], client: bool) -> None:
        key = _key()
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vlmesh-{name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(out / f"{name}.crt", _pem_cert(cert))
        _write(out / f"{name}.key", _pem_key(key), secret=True)

    for name in SERVICES:
        issue(name, [MESH_SERVER_NAME, "localhost"], ["127.0.0.1"], client=True)
    issue("tls", [MESH_SERVER_NAME, "localhost"], ["127.0.0.1"], client=True)  # shared by every service
    if public_hosts:
        dns = [h for h in public_hosts if not _is_ip(h)]
        ips = [h for h in public_hosts if _is_ip(h)]
        issue("public", dns, ips, client=False)
    return {name: MeshCertFiles(out / "ca.crt", out / f"{name}.crt", out / f"{name}.key") for name in SERVICES}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write ca.crt, ca.key and NAME.crt / NAME.key into")
    p.add_argument("--public-host", action="append", default=[], help="also a certificate for the public port with this name or IP (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity in days")


def run(args: argparse.Namespace) -> int:
    files = make_certs(args.out, args.public_host, args.days)
    print(f"wrote the mesh CA and certificates for {', '.join(files)} to {args.out}")
    print(f"  every service: --mesh-ca {Path(args.out) / 'ca.crt'}")
    for name, f in files.items():
        print(f"  {name}: --mesh-cert {f.cert} --mesh-key {f.key}")
    if args.public_host:
        print(f"  coordinator public port: --public-tls-cert {Path(args.out) / 'public.crt'} --public-tls-key {Path(args.out) / 'public.key'}")
    return 0
