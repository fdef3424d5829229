#!/bin/sh
# The container's entrypoint (Dockerfile): check the settings, wait for the database, apply the
# migrations, then serve. Runs the same outside a container (tests/deploy/test_entrypoint.py).
#
#   entrypoint.sh serve       wait, migrate, serve (the default command)
#   entrypoint.sh migrate     wait, migrate, exit (a one-shot migration job)
#   entrypoint.sh CMD ARGS    run anything else as given (python -m app create-user ..., bash)
#
# DATABASE_WAIT_SECONDS (default 60): how long to wait for the database before giving up.
# Several replicas may migrate at once: they take turns on a PostgreSQL advisory lock (app/migrate.py).
set -eu

PYTHON="${PYTHON:-python}"
command="${1:-serve}"

prepare() {
  # Settings are validated first: a production install without SECRET_KEY or MODEL_ID (or with a
  # placeholder secret) stops here, with the setting to fix, before anything else happens.
  "$PYTHON" -m app wait-for-database --timeout "${DATABASE_WAIT_SECONDS:-60}"
  "$PYTHON" -m app migrate
}

case "$command" in
  serve)
    prepare
    exec "$PYTHON" -m app serve
    ;;
  migrate)
    prepare
    ;;
  *)
    exec "$@"
    ;;
esac
