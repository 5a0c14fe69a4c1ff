# One image with both binaries: `ingest` and `consumer` (select with the command).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ingest -p consumer

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 app
COPY --from=build /src/target/release/ingest /src/target/release/consumer /usr/local/bin/
# The plan catalogue, replaceable by mounting another file here.
COPY deploy/plans/catalogue.json /app/deploy/plans/catalogue.json
USER app
ENV LOG_FORMAT=json
ENTRYPOINT []
CMD ["ingest"]
