# mqtapd: build with the Swift toolchain, run on slim Debian with only the runtime libraries.
#
#   docker build -t mqtapd .
#   docker run --rm --cap-add NET_ADMIN --device /dev/net/tun --network host \
#     -v /run/mqtapd:/run/mqtapd -v /var/lib/mqtapd:/var/lib/mqtapd mqtapd
#
# It runs as root: creating TUN/TAP devices needs CAP_NET_ADMIN, which --cap-add grants.

FROM docker.io/library/swift:6.3-bookworm AS build
# The -dev packages are what the build links against; versions follow Debian stable's
# security updates, so they are not pinned (pinning breaks the build at each point release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmicrohttpd-dev libjansson-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Package.swift openapi.yaml ./
COPY Sources ./Sources
COPY Tests ./Tests
RUN swift build -c release --static-swift-stdlib --product mqtapd \
 && swift build -c release --static-swift-stdlib --product mqtap \
 && install -m 0755 "$(swift build -c release --show-bin-path)/mqtapd" "$(swift build -c release --show-bin-path)/mqtap" \
    /usr/local/bin/

FROM docker.io/library/debian:bookworm-slim
# Only the two C libraries mqtapd links (the Swift runtime is static). Unpinned for the same
# reason as above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmicrohttpd12 libjansson4 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/mqtapd /usr/local/bin/mqtap /usr/local/bin/
VOLUME ["/var/lib/mqtapd", "/run/mqtapd"]
ENTRYPOINT ["/usr/local/bin/mqtapd"]
CMD ["--listen", "unix:/run/mqtapd/api.sock", "--state-dir", "/var/lib/mqtapd"]
