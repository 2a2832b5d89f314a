# syntax=docker/dockerfile:1
# vault: a small runtime image with the vault binary as entrypoint, running as a non-root user.
#   docker build -t activity-vault .
#   docker run --rm vault check-config /etc/vault/vault.example.toml

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Manifests first, so the dependency layer is cached across source changes.
COPY Cargo.toml Cargo.lock ./
COPY sandbox/Cargo.toml sandbox/Cargo.toml
RUN mkdir -p src sandbox/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > sandbox/src/main.rs && touch sandbox/src/lib.rs \
 && cargo build --release --locked --bin vault \
 && rm -rf src sandbox/src
COPY src src
COPY sandbox/src sandbox/src
# The commit shown in vault_build_info: docker build --build-arg VAULT_GIT_COMMIT=$(git rev-parse HEAD)
ARG VAULT_GIT_COMMIT=unknown
RUN touch src/main.rs src/lib.rs \
 && VAULT_GIT_COMMIT=$VAULT_GIT_COMMIT cargo build --release --locked --bin vault

FROM debian:bookworm-slim
# libssl3: TLS to Kafka and ScyllaDB. No curl or other HTTP client: the health check is the
# binary itself (`vault healthcheck`), so the image carries no tool an intruder could use.
# The base images are pinned by tag; pin them by digest (FROM image:tag@sha256:...) in your
# registry's build, where the digest can be looked up.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vault
COPY --from=build /src/target/release/vault /usr/local/bin/vault
COPY deploy/vault.example.toml /etc/vault/vault.example.toml
USER 10001:10001
ENV VAULT_METRICS_ADDR=0.0.0.0:9898 \
    VAULT_LOG_FORMAT=json
EXPOSE 9898
# GET http://127.0.0.1:9898/healthz by the binary; exit 0 on 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/vault", "healthcheck", "--addr", "127.0.0.1:9898", "--timeout", "2s"]
ENTRYPOINT ["/usr/local/bin/vault"]
CMD ["run"]
