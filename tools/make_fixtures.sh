#!/usr/bin/env bash
# Regenerates the golden vectors in tests/fixtures/nix/ with a real Nix (written against 2.8).
#
# What it makes, all from real Nix tools (nothing here is hand-written):
#   keys/            a binary-cache signing key pair from `nix-store --generate-binary-cache-key`
#   nars/<name>.nar  `nix-store --dump` of a few small store paths and of tree/ (see below)
#   <compression>/   what `nix copy --to file://...?secret-key=...&compression=<c>` wrote:
#                    the signed .narinfo files exactly as Nix wrote them, plus the compressed NARs
#   manifest.json    per store path: path, NAR file, narHash/narSize/references/deriver/ca
#                    from `nix path-info --json`
#   nix32.json       hex digests with their nix32 / SRI forms from `nix hash to-base32/to-sri`
#
# The store paths built here: `leaf` (a single regular file), `tree` (directories, an executable,
# symlinks, an empty file and an empty directory), `refs` (references leaf and tree), `self`
# (contains its own store path), plus two content-addressed paths (`builtins.toFile`, which gets
# `CA: text:...`, and `nix-store --add`, which gets `CA: fixed:r:...`) that have no deriver.
#
# tree/ is a plain directory (not in the store) whose layout tests/protocol/test_nar.py rebuilds
# from a description and serialises with larder.protocol.nar.dump_path; the bytes must equal
# nars/tree-dump.nar. Keep the two in step.
#
# Usage: tools/make_fixtures.sh   (as root, with Nix installed; the store is used directly)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/tests/fixtures/nix"
work="$(mktemp -d /tmp/larder-fixtures.XXXXXX)"
trap 'rm -rf "$work"' EXIT

export NIX_REMOTE=local
nixopts=(--option sandbox false --option substituters '' --extra-experimental-features nix-command)

echo "nix version: $(nix --version)"
rm -rf "$out"
mkdir -p "$out/keys" "$out/nars"

# -- derivations -----------------------------------------------------------------------------
cat >"$work/fixtures.nix" <<'EOF'
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ("PATH=/usr/bin:/bin\nset -e\n" + script) ];
  };
in rec {
  leaf = mk "larder-leaf" ''
    printf 'hello from larder\n' > "$out"
  '';
  tree = mk "larder-tree" ''
    mkdir -p "$out/bin" "$out/share/doc/deep/er" "$out/empty-dir"
    printf '#!/bin/sh\necho hello\n' > "$out/bin/hello"
    chmod +x "$out/bin/hello"
    ln -s hello "$out/bin/hi"
    ln -s ../share/doc "$out/docs"
    printf 'seven b' > "$out/share/doc/README"
    printf 'exactly8' > "$out/share/doc/deep/er/eight"
    : > "$out/share/empty"
    printf 'upper\n' > "$out/share/Upper"
  '';
  refs = mk "larder-refs" ''
    mkdir -p "$out"
    printf '%s\n' ${leaf} > "$out/leaf-path"
    ln -s ${tree}/bin/hello "$out/hello"
  '';
  self = mk "larder-self" ''
    mkdir -p "$out"
    printf '%s\n' "$out" > "$out/me"
    ln -s "$out/me" "$out/link-to-me"
  '';
}
EOF

paths=()
for attr in leaf tree refs self; do
  p="$(nix-build "${nixopts[@]}" --no-out-link "$work/fixtures.nix" -A "$attr")"
  paths+=("$p")
  echo "built $attr: $p"
done

text_path="$(nix eval "${nixopts[@]}" --raw --expr 'builtins.toFile "larder-note.txt" "a note\n"')"
paths+=("$text_path")
mkdir -p "$work/larder-added"
printf 'added with nix-store --add\n' >"$work/larder-added/file"
added_path="$(nix-store --add "$work/larder-added")"
paths+=("$added_path")
echo "content-addressed: $text_path $added_path"

# -- keys ------------------------------------------------------------------------------------
nix-store --generate-binary-cache-key larder-test-1 "$out/keys/secret.key" "$out/keys/public.key"

# -- nix copy to file:// caches, one per compression -----------------------------------------
for comp in xz none zstd bzip2; do
  cache="$work/cache-$comp"
  if nix copy "${nixopts[@]}" \
      --to "file://$cache?secret-key=$out/keys/secret.key&compression=$comp" "${paths[@]}"; then
    mkdir -p "$out/$comp"
    cp "$cache"/*.narinfo "$out/$comp/"
    cp "$cache/nix-cache-info" "$out/$comp/"
    if [ "$comp" != none ]; then
      mkdir -p "$out/$comp/nar"
      cp "$cache"/nar/* "$out/$comp/nar/"
    fi
    echo "copied with compression=$comp"
  else
    echo "nix copy with compression=$comp failed; skipped" >&2
  fi
done

# -- NARs and manifest -----------------------------------------------------------------------
nix path-info "${nixopts[@]}" --json "${paths[@]}" >"$work/path-info.json"
for p in "${paths[@]}"; do
  base="$(basename "$p")"
  name="${base#*-}"
  nix-store --dump "$p" >"$out/nars/$name.nar"
done

# tree/: the same layout as the `tree` derivation, made outside the store with plain tools.
t="$work/tree"
mkdir -p "$t/bin" "$t/share/doc/deep/er" "$t/empty-dir" "$t/a-b" "$t/a.b"
printf '#!/bin/sh\necho hello\n' >"$t/bin/hello"
chmod 755 "$t/bin/hello"
ln -s hello "$t/bin/hi"
ln -s ../share/doc "$t/docs"
ln -s /nix/store/absolute-target "$t/abs-link"
printf 'seven b' >"$t/share/doc/README"
printf 'exactly8' >"$t/share/doc/deep/er/eight"
: >"$t/share/empty"
printf 'upper\n' >"$t/share/Upper"
printf 'x' >"$t/a-b/one"
printf 'y' >"$t/a.b/two"
printf 'z' >"$t/a"
chmod 700 "$t/a"
head -c 20000 /dev/zero | tr '\0' 'q' >"$t/share/big"
chmod 644 "$t/share/big"
nix-store --dump "$t" >"$out/nars/tree-dump.nar"
nix-store --dump "$t/share/doc/README" >"$out/nars/tree-dump-file.nar"
nix-store --dump "$t/bin/hi" >"$out/nars/tree-dump-symlink.nar"

python3 - "$work/path-info.json" "$out" <<'EOF'
import base64, hashlib, json, os, sys

info = json.load(open(sys.argv[1]))
out = sys.argv[2]
if isinstance(info, dict):  # newer Nix: {path: info}
    info = [dict(v, path=k) for k, v in info.items()]
entries = []
for item in info:
    base = os.path.basename(item["path"])
    name = base.split("-", 1)[1]
    nar = f"nars/{name}.nar"
    data = open(os.path.join(out, nar), "rb").read()
    entries.append({
        "name": name,
        "path": item["path"],
        "nar": nar,
        "narHash": item["narHash"],
        "narSize": item["narSize"],
        "narSha256Hex": hashlib.sha256(data).hexdigest(),
        "references": item.get("references", []),
        "deriver": item.get("deriver"),
        "ca": item.get("ca"),
    })
for extra in ("tree-dump", "tree-dump-file", "tree-dump-symlink"):
    data = open(os.path.join(out, f"nars/{extra}.nar"), "rb").read()
    entries.append({"name": extra, "path": None, "nar": f"nars/{extra}.nar",
                    "narSize": len(data), "narSha256Hex": hashlib.sha256(data).hexdigest()})
for e in entries:
    if e["path"] is not None:
        # Cross-check: the narHash Nix recorded (SRI in 2.8; older Nix prints sha256:<nix32>,
        # which the tests check instead) is the sha256 of the dumped NAR.
        want = "sha256-" + base64.b64encode(bytes.fromhex(e["narSha256Hex"])).decode()
        if e["narHash"].startswith("sha256-") and e["narHash"] != want:
            sys.exit(f"narHash mismatch for {e['path']}: {e['narHash']} != {want}")
json.dump({"paths": entries}, open(os.path.join(out, "manifest.json"), "w"), indent=2)
EOF
# -- nix32 / SRI vectors ---------------------------------------------------------------------
{
  printf '['
  sep=''
  for algo in md5 sha1 sha256 sha512; do
    for input in '' 'a' 'larder' 'The quick brown fox jumps over the lazy dog'; do
      hex="$(printf '%s' "$input" | "${algo}sum" | cut -d' ' -f1)"
      b32="$(nix hash to-base32 "${nixopts[@]}" --type "$algo" "$hex")"
      b32_old="$(nix-hash --type "$algo" --to-base32 "$hex")"
      [ "$b32" = "$b32_old" ] || { echo "nix hash and nix-hash disagree" >&2; exit 1; }
      sri="$(nix hash to-sri "${nixopts[@]}" --type "$algo" "$hex")"
      printf '%s\n {"algo": "%s", "input": "%s", "hex": "%s", "nix32": "%s", "sri": "%s"}' \
        "$sep" "$algo" "$input" "$hex" "$b32" "$sri"
      sep=','
    done
  done
  # Digests with every bit pattern at the edges of the encoding.
  for hex in 0000000000000000000000000000000000000000000000000000000000000000 \
             ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff \
             0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20 \
             8000000000000000000000000000000000000000000000000000000000000001; do
    b32="$(nix hash to-base32 "${nixopts[@]}" --type sha256 "$hex")"
    sri="$(nix hash to-sri "${nixopts[@]}" --type sha256 "$hex")"
    printf ',\n {"algo": "sha256", "input": null, "hex": "%s", "nix32": "%s", "sri": "%s"}' \
      "$hex" "$b32" "$sri"
  done
  printf '\n]\n'
} >"$out/nix32.json"

cat >"$out/.gitattributes" <<'EOF'
*.nar binary
*.xz binary
*.zst binary
*.bz2 binary
# Nix writes these byte for byte; tests compare them exactly.
*.narinfo -text
*.key -text
nix-cache-info -text
EOF

nix --version >"$out/NIX_VERSION"
du -sh "$out"
