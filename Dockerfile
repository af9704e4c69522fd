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
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
    && rm -rf /var/lib/apt/lists/*
# A virtualenv at the same path as in the runtime stage, so its scripts' shebangs stay valid.
RUN python -m venv /opt/clip \
    && /opt/clip/bin/pip install --no-cache-dir --upgrade pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY snapshotter ./snapshotter
RUN /opt/clip/bin/pip install --no-cache-dir . \
    && /opt/clip/bin/clip --version

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="clip" \
      org.opencontainers.image.description="Lazy-loading containerd snapshotter for unmodified OCI images" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && apt-get install -y --no-install-recommends libfuse3-3 fuse3 \
    && rm -rf /var/lib/apt/lists/*
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
