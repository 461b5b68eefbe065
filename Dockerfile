# Build stage: the release binary. protoc is vendored by a build dependency; SQLite is bundled.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
RUN cargo build --release --locked && cp target/release/token-broker /token-broker

# Runtime stage: a small image running as a non-root user, the database on a volume.
# keys/ exists (owned by broker) so that an empty named volume mounted there starts out
# writable by broker: docker-compose.yml's `broker-keys` volume of the `replicas` profile.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/token-broker broker \
    && mkdir -p /var/lib/token-broker/keys \
    && chown broker /var/lib/token-broker /var/lib/token-broker/keys
COPY --from=build /token-broker /usr/local/bin/token-broker
USER broker
WORKDIR /var/lib/token-broker
VOLUME ["/var/lib/token-broker"]
ENV TOKEN_BROKER_LOG_FORMAT=json
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/token-broker"]
CMD ["serve", "--config", "/etc/token-broker/token-broker.toml"]
