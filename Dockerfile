# port443: TLS-terminating reverse proxy and HTTP->HTTPS redirector. See docs/CONTAINER.md.
#
#   docker build -t port443 .
#   docker build --build-arg WHEELHOUSE=wheelhouse -t port443 .   # offline, from ./wheelhouse
#
# BASE is any Debian-like image with python3 (>= 3.11) and the venv module; both stages use it,
# so the virtualenv built in the first one runs unchanged in the second. The default is Debian
# trixie's: its OpenSSL 3.5 gives the post-quantum key exchange (X25519MLKEM768).
ARG BASE=python:3.13-slim-trixie

# ---- build: a wheel of this project, installed with its dependencies into /opt/port443 ----
FROM ${BASE} AS build

# Empty: dependencies come from the package index. Set: a directory of the build context
# holding every wheel needed (dependencies and the build backend, setuptools); pip then runs
# with --no-index --find-links and never touches the network. .dockerignore lets "wheelhouse/"
# through; use that name or allow yours there.
ARG WHEELHOUSE=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY . .

# --copies: the virtualenv gets its own interpreter binary, so the capability set on it in the
# runtime stage is not shared with the image's system python; python3* become links to it.
RUN set -eu; \
    if [ -n "${WHEELHOUSE}" ]; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS="/src/${WHEELHOUSE}"; \
    fi; \
    python3 -m venv --copies /opt/port443; \
    for name in /opt/port443/bin/python3*; do \
        if [ -f "$name" ] && [ ! -L "$name" ]; then ln -sf python "$name"; fi; \
    done; \
    /opt/port443/bin/python -m pip wheel --no-deps --wheel-dir /tmp/dist /src; \
    /opt/port443/bin/python -m pip install /tmp/dist/port443-*.whl; \
    /opt/port443/bin/python -m pip uninstall --yes pip setuptools; \
    /opt/port443/bin/port443 --help > /dev/null

# ---- runtime ----
FROM ${BASE}

LABEL org.opencontainers.image.title="port443" \
      org.opencontainers.image.description="TLS-terminating reverse proxy and HTTP-to-HTTPS redirector" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed uid/gid, so that a bind-mounted certificate directory can be chowned to it up front.
# /opt/port443/bin stays out of PATH: only the `port443` command runs on the privileged
# interpreter, `python3` (the healthcheck, docker exec) is the image's plain one.
RUN groupadd --system --gid 10443 port443 \
    && useradd --no-log-init --uid 10443 --gid port443 --home-dir /var/lib/port443 \
        --no-create-home --shell /usr/sbin/nologin port443 \
    && mkdir -p /var/lib/port443/certs /etc/port443 \
    && chown -R port443:port443 /var/lib/port443 \
    && chmod 0750 /var/lib/port443/certs \
    && ln -s /opt/port443/bin/port443 /usr/local/bin/port443

COPY --from=build /opt/port443 /opt/port443
COPY container/port443.toml /etc/port443/port443.toml
COPY container/healthcheck.py /usr/local/lib/port443/healthcheck.py

# Let the non-root user bind ports 80 and 443: the file capability cap_net_bind_service=+ep on
# the virtualenv's interpreter, written as `setcap cap_net_bind_service=+ep` would write it
# (security.capability, VFS_CAP_REVISION_2 with the effective flag, permitted mask 0x400 =
# bit 10). Set here rather than in the build stage because not every builder keeps file
# capabilities through COPY (moby/buildkit#2250), and with python rather than setcap
# (libcap2-bin) so that offline builds need no Debian packages.
# Runtimes that forbid it (no-new-privileges, --cap-drop ALL): see docs/CONTAINER.md.
RUN python3 -c "import os, struct; os.setxattr('/opt/port443/bin/python', 'security.capability', struct.pack('<5I', 0x02000001, 0x400, 0, 0, 0))"

USER 10443:10443
WORKDIR /var/lib/port443

# Certificates, private keys, the local CA and the ACME account: must outlive the container.
VOLUME ["/var/lib/port443/certs"]
EXPOSE 80 443

# GET /healthz on the admin listener named in the config (PORT443_CONFIG, default the path
# below); with the admin listener off, a TCP connect to the HTTPS port. Plain python3, no shell.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "/usr/local/lib/port443/healthcheck.py"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["port443"]
CMD ["run", "-c", "/etc/port443/port443.toml"]
