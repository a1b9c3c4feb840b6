# One image for the vmfleet controller and its workers.
#   docker build -t vmfleet:0.1.0 .
# The controller runs `vmfleet controller` (the default command); the controller starts
# workers from the same image with `python -m remote_tasks.worker ...` as their args.
# Runs as the numeric non-root user 10001 (pods set runAsNonRoot: true).
#
# BASE_IMAGE: a Python 3.11 image with pip, groupadd and useradd. Users build on
# python:3.11-slim; `make image` (buildah, no Docker daemon) builds on a base made from
# Debian 12 packages by scripts/build-base-image.sh. The dependencies' wheels reach the
# final stage through a bind mount, so the image holds no copy of them and no build tools.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to vmfleet's code reuses
# this layer (and its downloads) from the build cache.
COPY pyproject.toml README.md ./
RUN mkdir -p vmfleet controller remote_tasks \
 && touch vmfleet/__init__.py controller/__init__.py remote_tasks/__init__.py \
 && pip wheel --no-cache-dir --wheel-dir /wheels/deps . \
 && rm -rf /wheels/deps/vmfleet-*.whl build *.egg-info vmfleet controller remote_tasks
COPY vmfleet ./vmfleet
COPY controller ./controller
COPY remote_tasks ./remote_tasks
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/app .

FROM ${BASE_IMAGE}
# The kubernetes client's asyncio copy (kubernetes.aio, ~70 MB) is never imported: it is
# removed in the layer that installs it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# A build cache keys a RUN by its text, not by what it mounts: this copy of
# pyproject.toml makes a change of the dependencies rebuild the layer below.
COPY pyproject.toml /usr/local/share/vmfleet/pyproject.toml
RUN --mount=type=bind,from=build,source=/wheels/deps,target=/wheels/deps \
    pip install --no-cache-dir --no-index --find-links=/wheels/deps /wheels/deps/*.whl \
 && rm -rf "$(python -c 'import kubernetes, os; print(os.path.dirname(kubernetes.__file__))')/aio" \
 && groupadd --system --gid 10001 vmfleet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin vmfleet
# vmfleet itself: a small wheel, copied (so its content keys the cache) and installed.
COPY --from=build /wheels/app /usr/local/share/vmfleet/wheels
RUN pip install --no-cache-dir --no-index --no-deps /usr/local/share/vmfleet/wheels/*.whl
WORKDIR /srv
USER 10001:10001
# 8080: kopf liveness (/healthz); 9807: controller /metrics; 9808: worker /metrics.
EXPOSE 8080 9807 9808
CMD ["vmfleet", "controller"]
