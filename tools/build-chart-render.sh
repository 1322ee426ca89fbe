#!/usr/bin/env bash
# Builds tools/chart-render (a `helm template` made of helm 3's template libraries) into
# build/chart-render/chart-render (ignored by git), for tests/deploy/test_chart_render.py.
# Needs Go and the libraries from Debian (tools/install-system-deps.sh installs them): GOPATH
# mode over /usr/share/gocode, no module download (GOPROXY=off). Idempotent and quick when done:
# it returns at once if the binary was built from the current main.go.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source="$repo/tools/chart-render/main.go"
target="$repo/build/chart-render"
if [ -x "$target/chart-render" ] && cmp -s "$source" "$target/built-from.go"; then
  exit 0
fi
command -v go >/dev/null 2>&1 || {
  echo "go is missing: \`make system-deps\` installs it (golang-go and helm's template libraries)" >&2
  exit 1
}
echo "building $target/chart-render" >&2
mkdir -p "$target/gopath/src/github.com/Masterminds/semver"
# Debian ships semver v3 at the import path without /v3, which sprig v3 imports.
ln -sfn /usr/share/gocode/src/github.com/Masterminds/semver \
  "$target/gopath/src/github.com/Masterminds/semver/v3"
tmp=$(mktemp -d "$target/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp "$source" "$tmp/main.go"
# Modules mode is no option: Debian's goutils has no go.mod.
(cd "$tmp" && GO111MODULE=off GOFLAGS= GOPROXY=off GOPATH="$target/gopath:/usr/share/gocode" \
  GOCACHE="$target/gocache" go build -o "$tmp/chart-render" main.go)
# Renamed into place, so tests running at once never see half a binary.
mv "$tmp/main.go" "$target/built-from.go.new"
mv "$tmp/chart-render" "$target/chart-render"
mv "$target/built-from.go.new" "$target/built-from.go"
