"""The mesh's mutual TLS: the CA, this service's certificate and key, and the name they carry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from .config import ServiceConfig

log = logging.getLogger(__name__)

# Every mesh certificate carries this DNS name, and the mesh's clients check it instead of the
# address they dial: replicas are reached by pod IP or by any DNS name, and the trust is in the
# mesh's own CA, not in names.
MESH_SERVER_NAME = "vlmesh-mesh"


@dataclass(frozen=True)
class MeshTLS:
    """The mesh's CA and this service's certificate and key (PEM bytes)."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_config(cls, cfg: ServiceConfig) -> MeshTLS | None:
        """None for --insecure; otherwise all three files, read now (a missing one is a clear error)."""
        files = {"--mesh-ca": cfg.mesh_ca, "--mesh-cert": cfg.mesh_cert, "--mesh-key": cfg.mesh_key}
        if cfg.insecure:
            if any(files.values()):
                raise ValueError("--insecure and mesh certificates exclude each other")
            log.warning("--insecure: the mesh's internal calls are plaintext and unauthenticated")
            return None
        missing = [flag for flag, path in files.items() if not path]
        if missing:
            raise ValueError(
                f"no mesh certificates ({', '.join(missing)} not set): make them with `vlmesh certs --out DIR`, "
                "or pass --insecure to run plaintext inside the mesh"
            )
        data = {}
        for flag, path in files.items():
            try:
                data[flag] = Path(path).read_bytes()
            except OSError as err:
                raise ValueError(f"{flag} {path}: {err.strerror}") from None
        return cls(data["--mesh-ca"], data["--mesh-cert"], data["--mesh-key"])

    def server_credentials(self) -> grpc.ServerCredentials:
        # require_client_auth: only callers holding a certificate the mesh's CA signed get in.
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)
