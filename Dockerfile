# syntax=docker/dockerfile:1.7
#
# visionserve container image. Three stages:
#   build   - builds wheels for visionserve and its dependencies, installs them into a
#             venv at /opt/visionserve and trims it (no pip, tests, caches, debug symbols);
#   models  - pulls the catalog models named by MODELS into the store, sha256-verified;
#   runtime - the base image plus the venv and the store, run as a non-root user.
#
#   docker build -t visionserve .
#   docker build -t visionserve --build-context model-mirror=../shared/models .   # offline
#   docker build -t visionserve --build-arg MODELS=yolox-nano,tiny-yolov2-voc .
#
# See docs/container.md.

ARG BASE_IMAGE=python:3.12-slim

# A model mirror for the build, empty by default so models come from their public URLs.
# `--build-context model-mirror=<folder>` replaces this stage with a folder laid out
# as <model folder>/<file> (the layout of a visionserve mirror).
FROM scratch AS model-mirror


FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# binutils for `strip` only; this stage is thrown away.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/visionserve
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/visionserve/bin/pip wheel --wheel-dir /wheels . \
 && /opt/visionserve/bin/pip install --no-index --no-compile --find-links /wheels visionserve
# Trim what a running server never uses: the installers, test suites, byte-code caches and
# debug symbols of extension modules (ml_dtypes and uvloop ship with them). Libraries that
# auditwheel vendored (*.libs) are already stripped and patchelf-edited: left alone.
RUN set -eu; \
    /opt/visionserve/bin/python -m pip uninstall -q -y pip setuptools wheel; \
    site="$(echo /opt/visionserve/lib/python3*/site-packages)"; \
    find "$site" -depth -type d \( -name __pycache__ -o -name tests -o -name test \) -exec rm -rf {} +; \
    find "$site" -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} +


FROM build AS models
# Comma- or space-separated catalog names; the first is what the image serves by default.
ARG MODELS=yolox-nano
ENV VISIONSERVE_MODEL_DIR=/models
RUN --mount=type=bind,from=model-mirror,target=/mirror \
    set -eu; \
    if [ -n "$(ls -A /mirror 2>/dev/null)" ]; then export VISIONSERVE_MODEL_MIRROR=/mirror; fi; \
    for name in $(echo "$MODELS" | tr ',' ' '); do /opt/visionserve/bin/visionserve models pull "$name"; done


FROM ${BASE_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/visionserve --no-create-home visionserve
COPY --from=build /opt/visionserve /opt/visionserve
COPY --from=models --chown=10001:10001 /models /var/lib/visionserve/models
ENV PATH=/opt/visionserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VISIONSERVE_MODEL_DIR=/var/lib/visionserve/models
USER 10001:10001
WORKDIR /var/lib/visionserve
EXPOSE 9130
# Plain urllib: the image needs no curl/wget. Ready means the default model is loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/visionserve/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VISIONSERVE_PORT', '9130'), timeout=2)"]
# Exec form: visionserve (uvicorn) is PID 1 and gets SIGTERM itself, so `docker stop`
# drains in-flight requests and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["visionserve"]
CMD ["serve", "--host", "0.0.0.0"]
