# The one image of the refund services: it runs any Procfile service by its command.
#
#   docker build -t pagoefectivo-refunds .
#   docker run --env-file refunds.env pagoefectivo-refunds python -m producers.http      # intake
#   docker run --env-file refunds.env pagoefectivo-refunds python -m receiver            # receiver
#   docker run --env-file refunds.env pagoefectivo-refunds dramatiq workers --processes 2 --threads 8 \
#       --worker-shutdown-timeout 70000                                                   # worker
#   docker run --env-file refunds.env pagoefectivo-refunds python -m workers.scheduler   # scheduler
#   docker run --env-file refunds.env pagoefectivo-refunds refundctl db migrate          # one-shot
#
# See docs/DEPLOYMENT.md. Runtime dependencies only: the [test] extra is not installed.

# --- build: a virtualenv with the project's runtime dependencies and the project itself ---------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler, only for a dependency that has no wheel for this platform (the runtime stage has none).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first, read from pyproject.toml's [project] dependencies (not the test extra),
# so that a change to the code alone reuses this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --upgrade pip "setuptools>=68" \
 && pip install -r /tmp/requirements.txt

# The project itself (schema.sql ships inside the refunds package, so `refundctl db migrate`
# works from the installed package).
COPY Procfile ./
COPY refunds ./refunds
COPY pagoefectivo ./pagoefectivo
COPY producers ./producers
COPY workers ./workers
COPY receiver ./receiver
COPY refundctl ./refundctl
RUN pip install --no-deps . \
 && python -m compileall -q /opt/venv/lib

# --- runtime: no compiler, no pip cache, a non-root user ---------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="pagoefectivo-refunds" \
      org.opencontainers.image.description="Queue-driven refund processing for marketplaces paid through PagoEfectivo" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 refunds \
 && useradd --system --uid 10001 --gid refunds --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin refunds \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/refunds/journal

# Owned by root and read-only to the service user; it writes only to /tmp (worker metrics files)
# and to the receiver's journal, /var/lib/refunds/journal (RECEIVER_JOURNAL_DIR: mount a volume
# there, one per receiver replica, so a journalled notification outlives the container).
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app

USER 10001:10001

# intake, receiver, worker metrics, scheduler metrics
EXPOSE 8080 8081 9191 9192

# Every service stops cleanly on SIGTERM: the HTTP services finish in-flight requests, dramatiq
# stops fetching and finishes in-flight messages (give it a grace period over
# --worker-shutdown-timeout). No default service: name the command (see the top of this file).
STOPSIGNAL SIGTERM
CMD ["refundctl", "--help"]
