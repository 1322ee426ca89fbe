#!/usr/bin/env bash
# Installs s3rver (npm), the S3 imitation tests/e2e/test_s3_compatible.py runs larder against,
# into build/s3rver (ignored by git) from the exact versions in tools/s3rver/package-lock.json.
# Needs node and npm (tools/install-system-deps.sh installs them). Idempotent and quick when
# done: it returns at once if the installed lock file is the pinned one.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target="$repo/build/s3rver"
if [ -x "$target/node_modules/.bin/s3rver" ] \
    && cmp -s "$repo/tools/s3rver/package-lock.json" "$target/package-lock.json"; then
  exit 0
fi
echo "installing s3rver into $target"
rm -rf "$target"
mkdir -p "$target"
cp "$repo/tools/s3rver/package.json" "$repo/tools/s3rver/package-lock.json" "$target/"
npm ci --prefix "$target" --no-audit --no-fund --ignore-scripts --loglevel=error
