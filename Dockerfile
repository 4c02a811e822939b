# syntax=docker/dockerfile:1
# wsdrain: a static, stripped binary on an empty image. Build with
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg VERSION=v1.0.0 -t wsdrain .

# The builder runs on the build machine's platform and cross-compiles, so a
# multi-arch build needs no emulation. Pinned: the Go version is part of the
# audited build.
FROM --platform=$BUILDPLATFORM golang:1.26.8 AS build
ARG TARGETOS=linux
ARG TARGETARCH=amd64
ARG VERSION=dev
WORKDIR /src
COPY go.mod ./
COPY *.go ./
# CGO_ENABLED=0: static, so it runs FROM scratch; -trimpath: no build paths
# in the binary; -s -w: no symbol or DWARF tables; the version is stamped.
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o /out/wsdrain .

FROM scratch
ARG VERSION=dev
LABEL org.opencontainers.image.title="wsdrain" \
      org.opencontainers.image.description="Sidecar that lets a pod terminate only after its last long-lived connection has ended" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/wsdrain /wsdrain
# Numeric, so runAsNonRoot can verify it. k8s.yaml runs the sidecar as this
# user; only k8s-shared-pid.yaml sets runAsUser to the app's UID, as the
# stopper may only signal and inspect processes of its own UID.
USER 65532:65532
ENTRYPOINT ["/wsdrain"]
