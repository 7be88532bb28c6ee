# syntax=docker/dockerfile:1.7
#
# visionserve container image.
#   build        - builds wheels for visionserve and its dependencies, installs them into a
#                  venv at /opt/visionserve and trims it;
#   models       - pulls the catalog models named by MODELS into a store, sha256-verified;
#   runtime-root - the base image without what a server never reads, plus the service user;
#   runtime      - that file system as one layer, then the venv and the models.
#
#   docker build -t visionserve .
#   docker build -t visionserve --build-context model-mirror=../shared/models .    # offline
#   docker build -t visionserve --build-arg MODELS=yolox-nano,tiny-yolov2-voc .
#
# See docs/container.md.

ARG BASE_IMAGE=python:3.12-slim

# A model mirror for the build: empty, so models come from their public URLs, unless
# `--build-context model-mirror=<folder>` replaces this stage with a folder laid out as
# <model folder>/<file> (a visionserve mirror, e.g. ../shared/models).
FROM scratch AS model-mirror


FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# binutils only for `strip`; this stage is thrown away.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/visionserve
WORKDIR /src
# Dependencies first, from pyproject alone, so that a source change reuses this layer.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && /opt/visionserve/bin/pip wheel --wheel-dir /wheels -r /tmp/requirements.txt \
 && /opt/visionserve/bin/pip install --no-index --no-compile --find-links /wheels -r /tmp/requirements.txt
COPY . .
RUN /opt/visionserve/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/visionserve/bin/pip install --no-index --no-compile --no-deps /wheels/visionserve-*.whl
# Trim what a running server never uses:
# - the installers, test suites and byte-code caches (sources compile in memory at start);
# - debug symbols of extension modules (ml_dtypes and uvloop ship with them). Libraries that
#   auditwheel vendored (*.libs) are already stripped and patchelf-edited: left alone;
# - onnxruntime's C-API library: its Python binding links ONNX Runtime in statically and
#   never loads it; and its model-conversion tools (transformers, quantization, tools);
# - what only compiling against numpy needs (headers, f2py, distutils) and type stubs.
RUN set -eu; \
    /opt/visionserve/bin/python -m pip uninstall -q -y pip setuptools wheel; \
    site="$(echo /opt/visionserve/lib/python3*/site-packages)"; \
    find "$site" -depth -type d \( -name __pycache__ -o -name tests -o -name test \) -exec rm -rf {} +; \
    find "$site" -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} +; \
    rm -rf "$site"/onnxruntime/capi/libonnxruntime.so.* \
           "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization "$site"/onnxruntime/tools \
           "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_core/include; \
    find "$site" -name '*.pyi' -delete; \
    /opt/visionserve/bin/python -c "import cv2, numpy, onnx, onnxruntime, PIL, uvloop, visionserve.server.app"; \
    find "$site" -depth -type d -name __pycache__ -exec rm -rf {} +


FROM build AS models
# Comma-separated catalog names; the first is the one served by default.
ARG MODELS=yolox-nano
ENV VISIONSERVE_MODEL_DIR=/models
RUN --mount=type=bind,from=model-mirror,target=/mirror \
    set -eu; \
    if [ -n "$(ls -A /mirror 2>/dev/null)" ]; then export VISIONSERVE_MODEL_MIRROR=/mirror; fi; \
    for name in $(echo "$MODELS" | tr ',' ' '); do /opt/visionserve/bin/visionserve models pull "$name"; done; \
    /opt/visionserve/bin/visionserve models verify


FROM ${BASE_IMAGE} AS runtime-root
# Package-manager caches and lists, manuals, translations, and the base's own pip and the
# wheels ensurepip installs from are never read by the server (it runs from its own venv).
# Licence files stay.
RUN set -eu; \
    rm -rf /var/cache/apt/* /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/* \
           /usr/share/man/* /usr/share/info/* /usr/share/locale/*; \
    find /usr/share/doc -type f ! -name copyright -delete; \
    rm -rf /usr/share/python-wheels "$(python3 -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))' 2>/dev/null || echo /nonexistent)/_bundled"; \
    for mod in pip setuptools pkg_resources wheel _distutils_hack; do \
        dir="$(python3 -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')" "$mod" 2>/dev/null || true)"; \
        if [ -n "$dir" ]; then rm -rf "$dir" "$dir"-*.dist-info "$dir"-*.egg-info; fi; \
    done; \
    useradd --uid 10001 --user-group --home-dir /var/lib/visionserve --create-home --shell /usr/sbin/nologin visionserve


# One layer for the operating system: files deleted above are really gone, not just hidden
# under a later layer (the base's own layers would otherwise keep every byte).
FROM scratch AS runtime
COPY --from=runtime-root / /
COPY --from=build /opt/visionserve /opt/visionserve
COPY --from=models --chown=10001:10001 /models /var/lib/visionserve/models
ARG MODELS=yolox-nano
ENV PATH=/opt/visionserve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VISIONSERVE_MODEL_DIR=/var/lib/visionserve/models \
    VISIONSERVE_MODELS=${MODELS}
USER 10001:10001
WORKDIR /var/lib/visionserve
EXPOSE 9130
# Plain urllib: the image needs no curl or wget. Ready means every configured model is loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/visionserve/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VISIONSERVE_PORT', '9130'), timeout=2)"]
# Exec form: visionserve (uvicorn) is PID 1 and gets SIGTERM itself, so `docker stop`
# lets in-flight requests finish and the process exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["visionserve"]
CMD ["serve", "--host", "0.0.0.0"]
