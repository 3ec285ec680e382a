# The coordinator's SuperLink: Flower's official image, unchanged except for a state directory
# owned by the image's non-root user (uid 49999), so that a named volume mounted there is
# writable and `--database state/state.db` survives restarts.
ARG FLWR_VERSION=1.42.0
FROM flwr/superlink:${FLWR_VERSION}

USER root
RUN mkdir -p /app/state && chown -R app:app /app/state
USER app
WORKDIR /app
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
