# syntax=docker/dockerfile:1
# The outbox-relay image: one static-ish binary on a slim base, configured with env alone
# (DATABASE_URL, RELAY_SOURCE, RELAY_SINK, RELAY_KAFKA_BROKERS, RELAY_AMQP_URL, RELAY_HTTP_ADDR).
#
#   docker build -t outbox-relay .
#   docker run --rm -e DATABASE_URL=... -e RELAY_SINK=kafka outbox-relay          # run
#   docker run --rm -e DATABASE_URL=... outbox-relay migrate

# rust:1-bookworm carries gcc, make and zlib, which librdkafka's bundled build needs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p outbox-relay \
 && cp target/release/outbox-relay /usr/local/bin/

FROM debian:bookworm-slim AS relay
RUN useradd --system --uid 10001 relay
COPY --from=build /usr/local/bin/outbox-relay /usr/local/bin/outbox-relay
USER 10001
# /metrics, /healthz, /readyz: reachable from outside the container.
ENV RELAY_HTTP_ADDR=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]
