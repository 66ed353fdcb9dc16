# syntax=docker/dockerfile:1
#
# The order service and the example inventory service, in one multi-stage build.
#
# NOTE: written without a Docker engine on the machine it was written on, so it
# has never been built; it was checked by reading only. Please report or fix
# anything that does not build.
#
#   docker build -t saga/order-service .                              # the order service (default)
#   docker build -t saga/inventory-service --build-arg BIN=inventory-service .
#
# Both binaries are built in the builder stage; BIN picks which one the runtime
# image runs. The runtime image is Debian slim with CA certificates (for amqps://
# and TLS to PostgreSQL) and runs as an unprivileged user.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
# protoc is vendored (protoc-bin-vendored); TLS is rustls + ring, so no
# OpenSSL is needed. jemalloc (the binaries' allocator) builds with the
# image's C compiler and make.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p order-service --bin order-service \
 && cargo build --release -p saga-examples --bin inventory-service \
 && mkdir -p /out \
 && cp target/release/order-service target/release/inventory-service /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /out/order-service /out/inventory-service /usr/local/bin/
ARG BIN=order-service
ENV APP_BIN=/usr/local/bin/${BIN}
USER 10001:10001
# The order service's defaults: gRPC on 50054, /metrics /healthz /readyz on 9004.
ENV GRPC_PORT=:50054 \
    METRICS_PORT=:9004 \
    LOG_FORMAT=json
EXPOSE 50054 9004
# Through sh so APP_BIN is expanded; `exec` replaces the shell, so the binary
# is PID 1 and receives the SIGTERM of `docker stop` (it then drains and exits 0).
ENTRYPOINT ["/bin/sh", "-c", "exec \"$APP_BIN\" \"$@\"", "--"]
