# Multi-stage build of every service binary. librdkafka is built from source by rdkafka-sys.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p topup -p topup-evaluator -p topup-payment-worker -p topup-notifier \
      -p topup-api -p topupctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 topup
COPY --from=build /src/target/release/topup \
                  /src/target/release/topup-evaluator \
                  /src/target/release/topup-payment-worker \
                  /src/target/release/topup-notifier \
                  /src/target/release/topup-api \
                  /src/target/release/topupctl /usr/local/bin/
USER topup
# Health (/healthz, /readyz) and Prometheus metrics (/metrics), with HTTP_ADDR=0.0.0.0:8080.
# topup-api serves those and /v1/... on API_ADDR instead (0.0.0.0:8088 in the deployments).
EXPOSE 8080 8088
# Each container picks its binary with `command:`; the default is the all-in-one.
CMD ["topup"]
