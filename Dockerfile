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
# The server uses OpenCV only for resizing, flips and drawing; 4.10 is the last release
# whose wheel does not bundle the AVIF/AV1 codec libraries, about 20 MB smaller.
ARG OPENCV_PIN="opencv-python-headless==4.10.0.84"
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && echo "$OPENCV_PIN" > /tmp/constraints.txt \
 && /opt/visionserve/bin/pip wheel --wheel-dir /wheels -r /tmp/requirements.txt -c /tmp/constraints.txt \
 && /opt/visionserve/bin/pip install --no-index --no-compile --find-links /wheels -r /tmp/requirements.txt -c /tmp/constraints.txt
COPY . .
RUN /opt/visionserve/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/visionserve/bin/pip install --no-index --no-compile --no-deps /wheels/visionserve-*.whl
# Trim what a running server never uses:
# - the installers, test suites and byte-code caches (sources compile in memory at start);
# - debug symbols of extension modules (ml_dtypes and uvloop ship with them). Libraries that
#   auditwheel vendored (*.libs) are already stripped and patchelf-edited: left alone;
# - onnxruntime's C-API library: its Python binding links ONNX Runtime in statically and
#   never loads it; and its model-conversion tools (transformers, quantization, tools);
# - what only compiling against numpy needs (headers, f2py, distutils) and type stubs;
# - ReDoc's script from fastapi-offline: the server offers Swagger UI (/docs) only;
# - OpenCV's Haar cascades (cv2/data/*.xml, 9.6 MB): face-detector data the server never
#   loads. cv2 imports cv2.data at start, so its __init__.py stays.
RUN set -eu; \
    /opt/visionserve/bin/python -m pip uninstall -q -y pip setuptools wheel; \
    site="$(echo /opt/visionserve/lib/python3*/site-packages)"; \
    find "$site" -depth -type d \( -name __pycache__ -o -name tests -o -name test \) -exec rm -rf {} +; \
    find "$site" -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} +; \
    rm -rf "$site"/onnxruntime/capi/libonnxruntime.so.* \
           "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization "$site"/onnxruntime/tools \
           "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_core/include \
           "$site"/fastapi_offline/static/redoc.standalone.js; \
    find "$site" -name '*.pyi' -delete; \
    find "$site"/cv2/data -name '*.xml' -delete; \
    # and the scripts of what was removed, which would only fail (f2py, onnxruntime_test, ...)
    for script in /opt/visionserve/bin/*; do \
        case "$(basename "$script")" in python*|activate*|visionserve) continue;; esac; \
        head -c 2 "$script" | grep -q '#!' && ! /opt/visionserve/bin/python "$script" --help >/dev/null 2>&1 \
            && rm -f "$script" || true; \
    done; \
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
    /opt/visionserve/bin/visionserve models verify; \
    # The image's configuration, in the lowest place a setting can come from: a config file
    # the user mounts (VISIONSERVE_CONFIG) replaces it, and any VISIONSERVE_* variable beats it.
    mkdir -p /config; \
    for name in $(echo "$MODELS" | tr ',' ' '); do printf '[[models]]\nname = "%s"\n\n' "$name"; done > /config/visionserve.toml


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
    # ... and what pointed at them: pip's commands, setuptools' import hook
    rm -f /usr/local/bin/pip /usr/local/bin/pip3* /usr/bin/pip /usr/bin/pip3*; \
    find / -xdev -name 'distutils-precedence.pth' -delete; \
    # No set-user-ID programs: nothing here should become another user.
    find / -xdev -type f -perm /6000 -exec chmod a-s {} +; \
    useradd --uid 10001 --user-group --home-dir /var/lib/visionserve --create-home --shell /usr/sbin/nologin visionserve; \
    # glibc's iconv modules and perl (only package maintainer scripts use it) are 18 MB the server
    # never loads. A derived image that needs apt-get reinstalls perl-base first.
    find /usr/lib -maxdepth 2 -type d -name gconv -exec rm -rf {} +; \
    dpkg --purge --force-remove-essential --force-depends perl-base >/dev/null 2>&1 || true; \
    rm -rf /usr/share/perl5 /usr/lib/*/perl-base /usr/bin/perl


# One layer for the operating system: files deleted above are really gone, not just hidden
# under a later layer (the base's own layers would otherwise keep every byte).
FROM scratch AS runtime
COPY --from=runtime-root / /
COPY --from=build /opt/visionserve /opt/visionserve
COPY --from=models --chown=10001:10001 /models /var/lib/visionserve/models
COPY --from=models /config/visionserve.toml /etc/visionserve/visionserve.toml
# ORT_DISABLE_TELEMETRY: ONNX Runtime would otherwise keep a device id under $HOME (and warn,
# in colour, in the middle of JSON logs, where $HOME cannot be written).
ENV PATH=/opt/visionserve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    VISIONSERVE_MODEL_DIR=/var/lib/visionserve/models \
    VISIONSERVE_CONFIG=/etc/visionserve/visionserve.toml
USER 10001:10001
WORKDIR /var/lib/visionserve
EXPOSE 9130
# Ready means every configured model is loaded. The check reads the port from the server's
# own settings (VISIONSERVE_PORT, the config file) and says why in one line when not ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["visionserve", "healthcheck"]
# Exec form: visionserve (uvicorn) is PID 1 and gets SIGTERM itself, so `docker stop`
# lets in-flight requests finish and the process exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["visionserve"]
CMD ["serve", "--host", "0.0.0.0"]
