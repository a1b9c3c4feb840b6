# One image for the vmfleet controller and its workers.
#   docker build -t vmfleet:0.1.0 .
# The controller runs `vmfleet controller` (the default command); the controller starts
# workers from the same image with `celery -A remote_tasks worker ...` as their args.
# Runs as the numeric non-root user 10001 (pods set runAsNonRoot: true).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vmfleet ./vmfleet
COPY controller ./controller
COPY remote_tasks ./remote_tasks
# vmfleet and every dependency as wheels; the final stage installs them without an index.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels vmfleet \
 && rm -rf /wheels \
 && groupadd --system --gid 10001 vmfleet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin vmfleet
WORKDIR /srv
USER 10001:10001
# 8080: kopf liveness (/healthz); 9807: controller /metrics; 9808: worker /metrics.
EXPOSE 8080 9807 9808
CMD ["vmfleet", "controller"]
