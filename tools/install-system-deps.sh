#!/usr/bin/env bash
# Installs the system packages the end-to-end tests drive, when they are missing:
# Nix (Debian's nix-bin) for the binary-cache tests. Needs root (apt-get).
set -euo pipefail
missing=()
command -v nix-store >/dev/null 2>&1 || missing+=(nix-bin)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
