# syntax=docker/dockerfile:1.7
# The GPU worker image: `arbor-worker` with libtorch 2.13 and the CUDA 13 runtime libraries taken
# from the same PyPI wheels the build links against (torch==2.13.0 and its nvidia-* wheels, as in
# scripts/requirements/torch.txt), run as a non-root user. The NVIDIA driver (libcuda) comes from
# the node through the NVIDIA container toolkit / GPU operator. Build from the repository root:
#   docker build -f deploy/images/arbor-worker.Dockerfile -t REGISTRY/arbor-worker:TAG .
# WORKER_FEATURES selects arbor-worker's cargo features (default `nccl`, the NCCL backend for
# multi-GPU training; `--build-arg WORKER_FEATURES=` builds a Gloo-only image), and
# BUILD_PIP_PACKAGES adds wheels the build needs beside torch and the CUDA C++ headers.

ARG RUST_VERSION=1.95.0
ARG TORCH_VERSION=2.13.0

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TORCH_VERSION
ARG WORKER_FEATURES="nccl"
# Extra wheels for the build stage only. The CUDA C++ headers the NCCL backend compiles against
# (scripts/requirements/cuda-headers.txt, about 3 MB) are always installed here.
ARG BUILD_PIP_PACKAGES=""
# Debian bookworm's python3 is 3.11, the interpreter the torch wheel is picked for; the packages
# are the build's own (scripts/apt-packages.txt): Gloo headers for the c10d shim, protoc, and
# libturbojpeg0-dev for arbor-data's DCT-scaled JPEG decoding.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv libgloo-dev protobuf-compiler libturbojpeg0-dev \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/requirements/cuda-headers.txt /tmp/cuda-headers.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "torch==${TORCH_VERSION}" \
       -r /tmp/cuda-headers.txt ${BUILD_PIP_PACKAGES}
ENV LIBTORCH=/opt/venv/lib/python3.11/site-packages/torch \
    LIBTORCH_CXX11_ABI=1
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY common common
COPY coordinator coordinator
COPY worker worker
COPY testkit testkit
# worker/build.rs bakes an rpath to $LIBTORCH/lib into the binary, so the runtime stage keeps
# the wheels at the same path; torch's own libraries find the nvidia ones by their
# $ORIGIN/../../nvidia/*/lib rpaths.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target,id=arbor-worker-target \
    cargo build --release --locked -p arbor-worker --bin arbor-worker \
       ${WORKER_FEATURES:+--features "$WORKER_FEATURES"} \
    && install -D -m 0755 target/release/arbor-worker /out/arbor-worker

FROM debian:bookworm-slim AS runtime
LABEL org.opencontainers.image.title="arbor-worker" \
      org.opencontainers.image.description="arbor training worker: arbor-worker with libtorch 2.13 and CUDA 13 runtime libraries" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates libgomp1 libturbojpeg0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 arbor \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin arbor
COPY --from=build /opt/venv/lib/python3.11/site-packages/torch/lib /opt/venv/lib/python3.11/site-packages/torch/lib
COPY --from=build /opt/venv/lib/python3.11/site-packages/nvidia /opt/venv/lib/python3.11/site-packages/nvidia
COPY --from=build /out/arbor-worker /usr/local/bin/arbor-worker
# The root filesystem is read-only in the pods: caches go to /tmp (an emptyDir there).
ENV HOME=/tmp \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ARBOR_LOG=info \
    ARBOR_COORDINATOR=arbor-coordinator:50051 \
    ARBOR_TOKEN_FILE=/var/run/secrets/arbor/token
USER 65532:65532
EXPOSE 29500
ENTRYPOINT ["/usr/local/bin/arbor-worker"]
CMD ["train", "--nproc", "1"]
