# redmux container image: build stage, then a slim runtime running as a non-root user.
#   docker build -t redmux .
#   docker run --rm -p 127.0.0.1:6380:6380 redmux                       # embedded toy upstream
#   docker run --rm -p 127.0.0.1:6380:6380 \
#     -v "$PWD/my-redmux.toml:/etc/redmux/redmux.toml:ro" redmux        # your own config
# The config is read from /etc/redmux/redmux.toml. Inside the container redmux listens on
# 0.0.0.0:6380 (the --listen flag below) so the published port reaches it.
# HEALTHCHECK runs `redmux --ping` with the same flags as CMD: it sends PING to the listening
# redmux and exits 0 on +PONG. With a real Redis upstream the PING goes through to Redis, so the
# container is unhealthy while Redis is unreachable.

FROM rust:1-bookworm AS build
WORKDIR /src
# What cargo reads to build: the manifest and lock file, and the files of every target the
# manifest declares (cargo stops before building anything if one is missing, the bench target's
# benches/resp.rs included). Nothing else, so a change to the docs or the tests does not
# invalidate this stage; rarely changed first. tests/dockerfile.rs builds from exactly these.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin redmux

FROM debian:bookworm-slim
# The system's CA certificates, for a rediss:// upstream without [upstream.tls] ca_file.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin redmux
COPY --from=build /src/target/release/redmux /usr/local/bin/redmux
COPY config/redmux.toml /etc/redmux/redmux.toml
USER redmux
EXPOSE 6380
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=10s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/redmux", "--ping", "--config", "/etc/redmux/redmux.toml", "--listen", "0.0.0.0:6380"]
ENTRYPOINT ["/usr/local/bin/redmux"]
CMD ["--config", "/etc/redmux/redmux.toml", "--listen", "0.0.0.0:6380"]
