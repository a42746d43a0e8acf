"""The mesh's internal APIs (stage and vision services). Installed with the services, left out of
the vlmesh-client distribution."""
