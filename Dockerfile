# walsaga: the relay, the participant runtime and the example services in one
# image; the command picks which (`walsaga relay`, `walsaga participant`...).
# docker-compose.yml builds it once and runs every walsaga service from it.
#
#   docker build -t walsaga:local .
#   docker run --rm walsaga:local walsaga --help
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The package and its dependencies, from this checkout (the wheel carries sql/
# inside the walsaga package), with the extra the example services need
# (`walsaga order-service`). .gitignore keeps build leftovers out of the wheel.
WORKDIR /src
COPY pyproject.toml README.md .gitignore ./
COPY sql/ sql/
COPY walsaga/ walsaga/
COPY relay/ relay/
COPY participants/ participants/
RUN pip install ".[examples]" \
    && rm -rf /src

COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/walsaga-healthcheck

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin walsaga
USER walsaga
WORKDIR /home/walsaga

CMD ["walsaga", "--help"]
