#!/bin/sh
# Entrypoint of the worker images: turns secrets mounted as files into the
# environment variables `worker` reads, then runs `worker` with the
# container's arguments (so SIGTERM reaches it directly).
#
# For each NAME below, NAME_FILE=/path sets NAME to the file's content (a
# trailing newline dropped) and is then unset. Setting both NAME and
# NAME_FILE is an error, as is an unreadable file.
set -eu

for name in HF_TOKEN CAPTURE_WORKER_TOKEN CAPTURE_TOKEN AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
  eval "file=\${${name}_FILE:-}"
  [ -n "$file" ] || continue
  eval "current=\${${name}:-}"
  if [ -n "$current" ]; then
    echo "capture-entrypoint: both $name and ${name}_FILE are set: set one" >&2
    exit 64
  fi
  if [ ! -r "$file" ]; then
    echo "capture-entrypoint: cannot read ${name}_FILE=$file: mount the secret there or unset ${name}_FILE" >&2
    exit 66
  fi
  value="$(cat "$file")"
  export "$name=$value"
  unset "${name}_FILE"
done

exec /usr/local/bin/worker "$@"
