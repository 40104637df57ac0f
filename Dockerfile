# The biofeed binary in a small Debian image. Built by compose/docker-compose.yml; works alone:
#   docker build -t biofeed . && docker run --rm biofeed --help
# The people's web app, built from its lockfile; the gateway embeds web/dist when it compiles.
FROM node:20-bookworm-slim AS web
WORKDIR /web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/build.mjs ./
COPY web/src ./src
RUN npm run build

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys with its configure script (make, a C compiler
# and zlib headers, all in the rust image).
RUN apt-get update && apt-get install -y --no-install-recommends zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
COPY --from=web /web/dist web/dist
RUN cargo build --release --locked --bin biofeed

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 biofeed
COPY --from=build /src/target/release/biofeed /usr/local/bin/biofeed
USER biofeed
ENTRYPOINT ["biofeed"]
