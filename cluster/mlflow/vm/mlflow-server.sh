#!/usr/bin/env bash
# Run the shared MLflow tracking server on a VM: PostgreSQL backend store, artifacts proxied to S3, MLflow's
# basic-auth app, listening on 127.0.0.1 only behind the TLS reverse proxy of nginx-mlflow.conf.
# Started by mlflow.service; `mlflow-server.sh --print` prints the server command instead of running it.
#
# Once, on the database host:
#   sudo -u postgres createuser --pwprompt mlflow
#   sudo -u postgres createdb -O mlflow mlflow && sudo -u postgres createdb -O mlflow mlflow_auth
#
# Secrets, from the environment only (systemd EnvironmentFile=/etc/clearair/mlflow.env, mode 600):
#   PGPASSWORD                      the PostgreSQL role's password; libpq reads it, so no URI carries it
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the basic-auth app's CSRF key
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin password, needed when the user store is first created
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role; MLFLOW_S3_ENDPOINT_URL for S3-compatible stores
# Settings: MLFLOW_PG_HOST (127.0.0.1), MLFLOW_PG_PORT (5432), MLFLOW_PG_USER (mlflow), MLFLOW_PG_DB (mlflow),
# MLFLOW_PG_AUTH_DB (mlflow_auth), MLFLOW_ARTIFACTS (s3://...), MLFLOW_PORT (5000), MLFLOW_WORKERS (4),
# MLFLOW_PUBLIC_HOST (the proxy's host name), MLFLOW_RUN_DIR (where the auth config is written), MLFLOW_BIN.
# A PostgreSQL on another host should require TLS: PGSSLMODE=verify-full and PGSSLROOTCERT=/path/to/ca.pem.
set -euo pipefail

MLFLOW_PG_HOST=${MLFLOW_PG_HOST:-127.0.0.1}
MLFLOW_PG_PORT=${MLFLOW_PG_PORT:-5432}
MLFLOW_PG_USER=${MLFLOW_PG_USER:-mlflow}
MLFLOW_PG_DB=${MLFLOW_PG_DB:-mlflow}
MLFLOW_PG_AUTH_DB=${MLFLOW_PG_AUTH_DB:-mlflow_auth}
MLFLOW_ARTIFACTS=${MLFLOW_ARTIFACTS:-s3://REPLACE_ME_BUCKET/mlflow-artifacts}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-4}
MLFLOW_PUBLIC_HOST=${MLFLOW_PUBLIC_HOST:-}
MLFLOW_RUN_DIR=${MLFLOW_RUN_DIR:-${RUNTIME_DIRECTORY:-/run/clearair-mlflow}}
MLFLOW_BIN=${MLFLOW_BIN:-mlflow}

missing=()
for var in PGPASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    [[ -n ${!var:-} ]] || missing+=("$var")
done
if ((${#missing[@]})); then
    echo "error: ${missing[*]} not set (put them in /etc/clearair/mlflow.env, mode 600)" >&2
    exit 2
fi

db_uri() { echo "postgresql+psycopg2://$MLFLOW_PG_USER@$MLFLOW_PG_HOST:$MLFLOW_PG_PORT/$1"; }

# The basic-auth app reads its user-store location from an ini file; it holds no secret but stays private.
mkdir -p -m 700 "$MLFLOW_RUN_DIR"
(
    umask 077
    cat >"$MLFLOW_RUN_DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = $(db_uri "$MLFLOW_PG_AUTH_DB")
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
)
export MLFLOW_AUTH_CONFIG_PATH="$MLFLOW_RUN_DIR/basic_auth.ini"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

allowed="localhost:*,127.0.0.1:*"
[[ -z $MLFLOW_PUBLIC_HOST ]] || allowed+=",$MLFLOW_PUBLIC_HOST,$MLFLOW_PUBLIC_HOST:*"

cmd=("$MLFLOW_BIN" server --app-name basic-auth --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
    --backend-store-uri "$(db_uri "$MLFLOW_PG_DB")" --artifacts-destination "$MLFLOW_ARTIFACTS" --serve-artifacts
    --allowed-hosts "$allowed")
if [[ ${1:-} == --print ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
