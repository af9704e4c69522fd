# clip container image: `clip serve` with the host's /dev/fuse, root dir and socket dir mounted.
#
#   docker build -t clip:0.1.0 .
#   docker run -d --name clip --privileged \
#     --device /dev/fuse \
#     -v /var/lib/clip:/var/lib/clip:rshared \
#     -v /run/clip:/run/clip \
#     -v /etc/clip:/etc/clip:ro \
#     clip:0.1.0
#
# Two stages: the builder has the compiler and headers that pyfuse3 needs to build; the
# runtime stage gets only the finished virtualenv plus the FUSE 3 library and fusermount3.
#
# BASE is any Debian bookworm image. The python:*-slim images bring CPython in /usr/local; a
# plain Debian base (`--build-arg BASE=debian:bookworm-slim`, or a debootstrapped one as in
# integration/test_container_image.py) has no python3, so both stages install Debian's. Both
# stages start from the same BASE, so the interpreter that the virtualenv's bin/python points
# to is at the same path in the runtime stage.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
RUN set -eu; \
    python=""; \
    command -v python3 >/dev/null || python="python3 python3-dev python3-venv"; \
    apt-get update; \
    apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev $python; \
    rm -rf /var/lib/apt/lists/*
# A virtualenv at the same path as in the runtime stage, so its scripts' shebangs stay valid.
RUN python3 -m venv /opt/clip
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY snapshotter ./snapshotter
# clip needs neither pip nor setuptools at run time (nothing it imports uses pkg_resources):
# they leave the venv here, a quarter of its size.
RUN /opt/clip/bin/pip install --no-cache-dir . \
    && /opt/clip/bin/python -m pip uninstall --yes pip setuptools \
    && /opt/clip/bin/clip --version

FROM ${BASE} AS runtime
LABEL org.opencontainers.image.title="clip" \
      org.opencontainers.image.description="Lazy-loading containerd snapshotter for unmodified OCI images" \
      org.opencontainers.image.licenses="Apache-2.0"
# `apt-get clean`: Debian's own images drop apt's package caches after each install, a plain
# debootstrapped base does not, and they would be a third of this layer.
RUN set -eu; \
    python=""; \
    command -v python3 >/dev/null || python="python3"; \
    apt-get update; \
    apt-get install -y --no-install-recommends libfuse3-3 fuse3 $python; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/clip /opt/clip
ENV PATH=/opt/clip/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# root, on purpose: clip mounts its FUSE tree into the host's mount namespace (CAP_SYS_ADMIN),
# presents files with their original owners to overlayfs and containerd (both root), reads
# and writes trusted.* xattrs (root only), and removes snapshot directories that containers
# filled with files owned by arbitrary uids. An unprivileged user could do none of these.
USER root
VOLUME ["/var/lib/clip", "/run/clip"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["clip", "status", "--address", "/run/clip/clip.sock"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["clip"]
CMD ["serve", "--root", "/var/lib/clip", "--address", "/run/clip/clip.sock", "--config", "/etc/clip/clip.toml"]
