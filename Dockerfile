# syntax=docker/dockerfile:1
# The one Trellis image: control plane, ztunnel, waypoint, node agent and CNI plugin (the
# chart and the waypoint Deployments run each with its own command). Built by `make images`.
#
# Runtime base: Debian slim, not distroless — the node agent runs `nft`, `ip` and `nsenter`
# inside pods' network namespaces, so those tools must be in the image. The Rust binaries
# link only glibc.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p trellis-control-plane -p trellis-ztunnel -p trellis-waypoint -p trellis-cni-plugin -p trellisctl \
      -p trellis-e2e --bins \
 && mkdir -p /out \
 && cp target/release/trellis-control-plane target/release/trellis-ztunnel target/release/trellis-waypoint \
       target/release/trellis-node-agent target/release/trellis-cni \
       target/release/trellisctl target/release/trellis-testapp /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Components that need no privileges run as this user (the chart sets it too); ztunnel and
# the node agent run as root with the capabilities the chart grants.
USER 65532:65532
ENTRYPOINT []
