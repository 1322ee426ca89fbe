#!/usr/bin/env bash
# Installs a current Nix (Debian sid's nix-bin, 2.3x) and sccache (sid, 0.17) beside the
# system's own Nix 2.8, without changing the system: the end-to-end tests run every real-client
# case against both.
#
# How: `apt-get download` with a private apt state (nothing under /etc/apt or /var/lib/apt),
# `dpkg-deb -x` of nix-bin, everything it depends on and sccache into $SID_ROOT (no maintainer
# scripts, no dpkg database), and wrapper scripts in $SID_PREFIX/bin that start each binary
# through sid's own dynamic loader and libraries. Nix reads a private nix.conf
# ($SID_PREFIX/etc/nix); the tests use it only with chroot stores (`--store DIR`), never the
# system's /nix/var/nix/db.
#
# Quirk: the loader is the process's executable, so sccache 0.17 cannot start its own server
# in the background; tests start it in the foreground (SCCACHE_START_SERVER=1
# SCCACHE_NO_DAEMON=1).
#
# Idempotent and quick when done: it returns at once if both wrappers answer. FORCE=1 redoes it.
set -euo pipefail

SID_PREFIX=${LARDER_SID_PREFIX:-/opt/nix234}
SID_ROOT=${LARDER_SID_ROOT:-${SID_PREFIX}root}
APT_STATE=${LARDER_SID_APT:-/var/tmp/larder-sid-apt}
MIRROR=${LARDER_SID_MIRROR:-http://deb.debian.org/debian}

if [ "${FORCE:-0}" != 1 ] && "$SID_PREFIX/bin/nix" --version >/dev/null 2>&1 \
    && "$SID_PREFIX/bin/sccache" --version >/dev/null 2>&1; then
  exit 0
fi
rm -rf "$SID_ROOT" "$SID_PREFIX"

mkdir -p "$APT_STATE/lists/partial" "$APT_STATE/archives/partial" "$APT_STATE/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main" \
  > "$APT_STATE/sources.list"
apt_private=(
  -o Dir::Etc::sourcelist="$APT_STATE/sources.list" -o Dir::Etc::sourceparts=-
  -o Dir::State::lists="$APT_STATE/lists" -o Dir::Cache="$APT_STATE"
  -o Dir::Cache::archives="$APT_STATE/archives" -o APT::Sandbox::User=root
)
echo "fetching Nix and sccache from Debian sid into $SID_ROOT"
apt-get -q "${apt_private[@]}" update >/dev/null

# nix-bin and its whole dependency tree (real packages only), the C runtime they were built
# against, and sccache.
packages=$(
  {
    apt-cache "${apt_private[@]}" depends --recurse --no-recommends --no-suggests \
      --no-conflicts --no-breaks --no-replaces --no-enhances nix-bin | grep -v -e '^ ' -e '^<'
    printf '%s\n' libc6 libstdc++6 libgcc-s1 sccache
  } | sort -u
)
(cd "$APT_STATE/debs" && rm -f ./*.deb && apt-get -q "${apt_private[@]}" download $packages)

mkdir -p "$SID_ROOT"
for deb in "$APT_STATE/debs"/*.deb; do dpkg-deb -x "$deb" "$SID_ROOT"; done

loader=""
for candidate in usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 lib64/ld-linux-x86-64.so.2 \
    usr/lib64/ld-linux-x86-64.so.2 lib/x86_64-linux-gnu/ld-linux-x86-64.so.2; do
  if [ -f "$SID_ROOT/$candidate" ] && [ ! -L "$SID_ROOT/$candidate" ]; then
    loader="$SID_ROOT/$candidate"
    break
  fi
done
[ -n "$loader" ] || { echo "no dynamic loader in $SID_ROOT" >&2; exit 1; }
libs="$SID_ROOT/usr/lib/x86_64-linux-gnu"
for dir in "$SID_ROOT/usr/lib/x86_64-linux-gnu/nix" "$SID_ROOT/usr/lib/nix"; do
  [ -d "$dir" ] && libs="$libs:$dir"
done

# Builders see the host's /usr (coreutils) and sid's static bash as /bin/sh; on a merged-/usr
# host /lib and /lib64 are links, so the real directories are bound.
sandbox_paths="/bin/sh=$SID_ROOT/usr/bin/bash-static"
for dir in /usr /lib /lib64; do
  if [ -L "$dir" ]; then
    sandbox_paths="$sandbox_paths $dir=$(readlink -f "$dir")"
  elif [ -d "$dir" ]; then
    sandbox_paths="$sandbox_paths $dir"
  fi
done
mkdir -p "$SID_PREFIX/bin" "$SID_PREFIX/etc/nix"
cat > "$SID_PREFIX/etc/nix/nix.conf" <<EOF
# Private to larder's tests: chroot stores only, no build users, no remote builders.
experimental-features = nix-command
sandbox = false
build-users-group =
sandbox-paths = $sandbox_paths
build-hook =
substituters =
require-sigs = true
EOF

wrap() { # NAME BINARY: a wrapper that runs BINARY as NAME through sid's loader
  cat > "$SID_PREFIX/bin/$1" <<EOF
#!/bin/sh
: "\${NIX_CONF_DIR:=$SID_PREFIX/etc/nix}"
export NIX_CONF_DIR
exec "$loader" --library-path "$libs" --argv0 "$1" "$2" "\$@"
EOF
  chmod 755 "$SID_PREFIX/bin/$1"
}
nix_binary="$SID_ROOT/usr/bin/nix"
wrap nix "$nix_binary"
for tool in "$SID_ROOT"/usr/bin/nix-*; do
  if [ -L "$tool" ] || cmp -s "$tool" "$nix_binary"; then wrap "$(basename "$tool")" "$nix_binary"; fi
done
wrap sccache "$SID_ROOT/usr/bin/sccache"

"$SID_PREFIX/bin/nix" --version
"$SID_PREFIX/bin/sccache" --version
