# Margay's image: margay-agent (the DaemonSet's agent and its install-cni
# init container), the `margay` CNI plugin it installs, and margayctl.
#
#   docker build -t ghcr.io/margay-dev/margay:0.1.0 .
#
# Stage 1 builds the release binaries the repository's own way (the
# workspace, locked dependencies); stage 2 is a small Debian with only what
# the agent execs at run time: `nft` (natOutgoing).

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p margay-agent -p margay-cni \
    && strip target/release/margay-agent target/release/margayctl target/release/margay

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/margay-agent /usr/local/bin/margay-agent
COPY --from=build /src/target/release/margayctl /usr/local/bin/margayctl
COPY --from=build /src/target/release/margay /usr/local/bin/margay
ENTRYPOINT ["/usr/local/bin/margay-agent"]
CMD ["run"]
