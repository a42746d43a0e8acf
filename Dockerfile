# syntax=docker/dockerfile:1
# vlmesh: one image for every service -- `vlmesh serve vision|stage|coordinator ...` (k8s/).
#
#   docker build -t vlmesh:0.1.0 .                      # CPU-only torch (PyTorch's CPU wheel index)
#   docker build -t vlmesh:0.1.0-cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch (GPU nodes)
#
# The CUDA variant is the same image with torch's CUDA wheels (they bring their own CUDA runtime
# libraries; the node needs the NVIDIA driver and container toolkit). Pick the index of a CUDA
# version your driver supports from PyTorch's install matrix for this torch version.
#
# The shipped shapes model is copied to /opt/vlmesh/models/shapes-qwen2-vl and is the default
# --model (VLMESH_MODEL), so `docker run vlmesh:0.1.0 serve stage --layers 0:2` needs no volume.
# The services run as the unprivileged user 10001; the root filesystem can be read-only given a
# writable /tmp and ~/.cache (k8s/ mounts emptyDirs there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Keep these equal to pyproject.toml's pins (tests/test_dockerfile.py checks).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from PyTorch's index: the plain PyPI wheel would pull gigabytes of CUDA libraries.
# `pip install .` below then finds torch==2.14.1 satisfied (2.14.1+cpu is 2.14.1).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY services ./services
# As the README installs it (pip install of the checkout), but not editable: the image keeps no source tree.
RUN pip install . && vlmesh serve --help

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 vlmesh \
    && useradd --uid 10001 --gid 10001 --home-dir /home/vlmesh --create-home --shell /usr/sbin/nologin vlmesh
COPY --from=build /opt/venv /opt/venv
COPY services/assets/shapes-qwen2-vl /opt/vlmesh/models/shapes-qwen2-vl
ENV PATH=/opt/venv/bin:$PATH \
    VLMESH_MODEL=/opt/vlmesh/models/shapes-qwen2-vl \
    HOME=/home/vlmesh \
    HF_HOME=/home/vlmesh/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/vlmesh
# gRPC: coordinator 50051, stage 50061, vision 50071; health (plaintext grpc.health.v1) 8081; metrics 9100
EXPOSE 50051 50061 50071 8081 9100
ENTRYPOINT ["vlmesh"]
CMD ["serve", "--help"]
