#!/usr/bin/env bash
# Starts the services the tests need on loopback, if they are not running
# already, and exports where they are:
#   PostgreSQL 15 (installed on the machine, stopped by default):
#     DATABASE_URL=postgres://capture:capture@127.0.0.1:5432/capture
#   moto_server (Python moto) as an S3 endpoint:
#     CAPTURE_S3_ENDPOINT=http://127.0.0.1:$CAPTURE_S3_PORT (default 5599),
#     AWS_ACCESS_KEY_ID=testing, AWS_SECRET_ACCESS_KEY=testing, AWS_REGION=us-east-1
# Source it: `source scripts/services.sh`. `stop_services` stops what this
# script started (and nothing else).
set -euo pipefail

_services_started=()

start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "services: PostgreSQL is not installed; run: apt-get install -y postgresql-15" >&2
    return 1
  fi
  if ! pg_lsclusters -h 2>/dev/null | awk '$1 == 15 && $2 == "main" && $4 == "online"' | grep -q .; then
    pg_ctlcluster 15 main start
    _services_started+=(postgres)
  fi
  for _ in $(seq 1 50); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 0.2
  done
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'capture'\"" | grep -q 1 ||
    su postgres -c "psql -qc \"CREATE ROLE capture LOGIN SUPERUSER PASSWORD 'capture'\""
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = 'capture'\"" | grep -q 1 ||
    su postgres -c "psql -qc \"CREATE DATABASE capture OWNER capture\""
  export DATABASE_URL="postgres://capture:capture@127.0.0.1:5432/capture"
}

start_moto() {
  local port="${CAPTURE_S3_PORT:-5599}"
  export CAPTURE_S3_ENDPOINT="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
  if curl -fsS -o /dev/null "$CAPTURE_S3_ENDPOINT/" 2>/dev/null; then
    return 0
  fi
  local moto
  moto="$(command -v moto_server || true)"
  if [ -z "$moto" ]; then
    python3 -m pip install --quiet 'moto[server]'
    moto="$(command -v moto_server)"
  fi
  "$moto" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/capture-moto-$port.log" 2>&1 &
  _moto_pid=$!
  _services_started+=(moto)
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$CAPTURE_S3_ENDPOINT/" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "services: moto_server did not start on port $port (see ${TMPDIR:-/tmp}/capture-moto-$port.log)" >&2
  return 1
}

stop_services() {
  local s
  for s in "${_services_started[@]:-}"; do
    case "$s" in
      postgres) pg_ctlcluster 15 main stop || true ;;
      moto) kill "$_moto_pid" 2>/dev/null || true ;;
    esac
  done
}
