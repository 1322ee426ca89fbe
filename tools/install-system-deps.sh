#!/usr/bin/env bash
# Installs the system packages the end-to-end tests drive, when they are missing (needs root):
# - Nix (Debian's nix-bin) for the binary-cache tests;
# - Prometheus, which scrapes a running larder in the metrics tests, and its promtool, which
#   evaluates the dashboard's queries and the documented alerts in rule unit tests;
# - the registry crates the offline Rust test workspace depends on (Debian's librust-*-dev,
#   unpacked into /usr/share/cargo/registry, used as a cargo directory source);
# - Nix and sccache from Debian sid, privately (tools/install-nix-sid.sh);
# - a C compiler and ar (gcc, binutils): rustc links with cc, and a workspace crate's build
#   script compiles a C library;
# - node and npm (nodejs, npm), to install s3rver, an S3 imitation, into build/s3rver
#   (tools/install-s3rver.sh, pinned by tools/s3rver/package-lock.json).
# - libfaketime (faketime), a process's clock set apart from the files' in the rustc shim tests;
# - nginx, the caching proxy in front of larder in tests/e2e/test_caching_proxy.py and the peer
#   the benchmarks measure against;
# - Go and the libraries helm 3 renders templates with (sprig v3, sigs.k8s.io/yaml), to build
#   the chart renderer the chart tests use into build/chart-render (tools/build-chart-render.sh).
set -euo pipefail
missing=()
command -v nix-store >/dev/null 2>&1 || missing+=(nix-bin)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v ar >/dev/null 2>&1 || missing+=(binutils)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || missing+=(faketime)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || missing+=(golang-github-masterminds-sprig-dev)
[ -d /usr/share/gocode/src/sigs.k8s.io/yaml ] || missing+=(golang-k8s-sigs-yaml-dev)
for crate in itoa hex memchr fnv proc-macro2 quote syn unicode-ident; do
  compgen -G "/usr/share/cargo/registry/${crate}-*" >/dev/null || missing+=("librust-${crate}-dev")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo and rustc must be on PATH" >&2; exit 1; }
# A current Nix and sccache 0.17 from Debian sid, privately (every real-client test runs
# against both versions).
bash "$(dirname "$0")/install-nix-sid.sh"
# s3rver for the end-to-end tests against an S3 imitation other than moto.
bash "$(dirname "$0")/install-s3rver.sh"
# The chart renderer (helm's template libraries) for tests/deploy/test_chart_render.py.
bash "$(dirname "$0")/build-chart-render.sh"
