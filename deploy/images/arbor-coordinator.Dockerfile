# syntax=docker/dockerfile:1.7
# The control-plane image: the `arbor` binary alone (no libtorch, no shell), run as a non-root
# user. Build from the repository root (see deploy/README.md):
#   docker build -f deploy/images/arbor-coordinator.Dockerfile -t REGISTRY/arbor-coordinator:TAG .
# The same image runs `arbor coordinator`, `arbor index`, `arbor status` and the libtorch-free
# `arbor worker --dry-run` (the cpu-smoke overlay's workers).

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS build
# arbor-data (the indexer and the dry-run loader) links libjpeg-turbo's TurboJPEG API.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libturbojpeg0-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /out/lib \
    && cp -L /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0 /out/lib/
WORKDIR /build
# The whole workspace manifest is needed to resolve the lock file; only the coordinator's crates
# (and the libtorch-free ones it depends on) are compiled.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY common common
COPY coordinator coordinator
COPY worker worker
COPY testkit testkit
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target,id=arbor-coordinator-target \
    cargo build --release --locked -p arbor-coordinator --bin arbor \
    && install -D -m 0755 target/release/arbor /out/arbor

# distroless/cc has glibc and libgcc_s; `arbor` uses rustls, not OpenSSL, and needs only
# libturbojpeg beside them, copied from the build stage.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="arbor-coordinator" \
      org.opencontainers.image.description="arbor control plane: coordinator, indexer, status, dry-run worker" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/arbor /usr/local/bin/arbor
COPY --from=build /out/lib/libturbojpeg.so.0 /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0
ENV ARBOR_LOG=info
# 65532 is distroless's `nonroot`; the Kubernetes manifests run the pods as this uid.
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/arbor"]
CMD ["coordinator", "--config", "/etc/arbor/job.toml"]
