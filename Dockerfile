# swapctl in a container: `swapctl up` on 0.0.0.0:8080, its config at /etc/swapctl/swapctl.yaml,
# the host's Docker engine through its socket (see the README's "swapctl in a container").
#
#   docker build -t swapctl .                  from this checkout, pip fetching the dependencies
#   bash scripts/image-wheels.sh build/swapctl-image/wheels 3.14
#   docker build -t swapctl --build-arg BASE=swapctl/llama-server:sid -f Dockerfile build/swapctl-image
#                                              offline: only the wheels in the context's wheels/
#
# BASE is any image with python3 (3.11 or later) and its venv module; it needs no pip when the
# context brings wheels/ (pip runs from its own wheel there).
ARG BASE=python:3.13-slim
FROM ${BASE}

COPY . /src
RUN set -eu; \
    python3 -m venv --without-pip /opt/swapctl; \
    if [ -d /src/wheels ]; then \
        /opt/swapctl/bin/python "$(ls /src/wheels/pip-*.whl | head -n 1)/pip" install \
            --no-cache-dir --no-index --find-links /src/wheels swapctl; \
    else \
        python3 -m pip --python /opt/swapctl/bin/python install --no-cache-dir /src; \
    fi; \
    rm -rf /src; \
    mkdir -p /etc/swapctl /var/lib/swapctl

ENV PATH=/opt/swapctl/bin:$PATH \
    SWAPCTL_CONFIG=/etc/swapctl/swapctl.yaml \
    SWAPCTL_STATE_DIR=/var/lib/swapctl \
    PYTHONUNBUFFERED=1
EXPOSE 8080
# Docker's stop signal is SIGTERM: `up` stops as on Ctrl-C (--stop-on-exit says what becomes of the models)
ENTRYPOINT ["swapctl", "up", "--listen", "0.0.0.0:8080"]
