# syntax=docker/dockerfile:1
#
# cobi-sync image: one binary, the daemon (`run`, the default command) and
# the local stand-in of the Cobi Data API (`mock-api`).
#
#   docker build -t cobi-sync .
#   docker run --rm -v /path/cobi-sync.toml:/etc/cobi-sync/cobi-sync.toml:ro \
#     -v cobi-sync-state:/var/lib/cobi-sync -e COBI_API_KEY=... cobi-sync
#
# docker-compose.yml uses it for a local trial. Needs BuildKit (the default
# builder since Docker 23).

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what the build reads, so target/ and the rest stay out of the build.
COPY Cargo.toml Cargo.lock ./
COPY src/ src/
# Cargo checks that the bench targets Cargo.toml declares exist; the wildcard
# makes this a no-op in a tree without benches/.
COPY bench[e]s/ benches/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cobi-sync \
    && install -D -m 0755 target/release/cobi-sync /out/cobi-sync

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# An unprivileged user that owns the state directory. A named volume mounted
# on /var/lib/cobi-sync starts with this ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cobi-sync \
        --no-create-home --shell /usr/sbin/nologin cobi-sync \
    && install -d -o cobi-sync -g cobi-sync -m 0700 /var/lib/cobi-sync
COPY --from=build /out/cobi-sync /usr/local/bin/cobi-sync
USER cobi-sync:cobi-sync
WORKDIR /var/lib/cobi-sync
VOLUME ["/var/lib/cobi-sync"]
ENV COBI_SYNC_CONFIG=/etc/cobi-sync/cobi-sync.toml
# 9187: the daemon's /healthz /readyz /metrics /status (set http.listen to
# 0.0.0.0:9187 in a container); 8080: mock-api, if run with that --listen.
EXPOSE 9187 8080
# SIGTERM: finish in-flight requests, persist progress, exit 0 within ~10 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cobi-sync"]
CMD ["run"]
