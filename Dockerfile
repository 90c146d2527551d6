# The fedmesh image: one binary for the controller, the gateway, the
# sidecar and the redirect init container.
#
#   docker build -t fedmesh:dev .
#
# Build stage: the default release binary (the etcd store and the
# Kubernetes source included; no protoc needed, and the release profile
# already leaves debug info out).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fedmesh-cli

# Runtime: Debian slim (glibc for the binary) plus nftables for the
# sidecar's redirect init container; nothing else. Runs as a non-root
# user; the init container alone is run as root by its pod spec.
FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 fedmesh \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin fedmesh
COPY --from=build /src/target/release/fedmesh /usr/local/bin/fedmesh
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/fedmesh"]
