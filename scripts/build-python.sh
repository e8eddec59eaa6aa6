#!/usr/bin/env bash
# Build CPython from Debian's source package into a cache outside the clone, once.
#
#   scripts/build-python.sh VERSION [--disable-gil]      e.g. 3.13, or 3.13 --disable-gil (3.13t)
#
# Prints the interpreter's path on its last line. A second run finds the interpreter and returns
# at once. The source comes from Debian's `pythonVERSION` source package (suite trixie, through a
# deb-src entry this script adds if none is there); nothing prebuilt is downloaded. Set
# KAMEO_PYTHONS to put the cache elsewhere (default ~/.cache/kameo/pythons).
set -euo pipefail

usage() { echo "usage: $0 VERSION [--disable-gil]" >&2; exit 2; }
[ $# -ge 1 ] || usage
version=$1; shift
case "$version" in 3.[0-9]|3.[0-9][0-9]) ;; *) usage ;; esac
gil=yes
for arg in "$@"; do
  case "$arg" in --disable-gil) gil=no ;; *) usage ;; esac
done
tag=$version; [ "$gil" = no ] && tag=${version}t
root=${KAMEO_PYTHONS:-${XDG_CACHE_HOME:-$HOME/.cache}/kameo/pythons}
prefix=$root/$tag
exe=$prefix/bin/python$tag

if [ -x "$exe" ] && "$exe" -c 'import ssl, sqlite3, ctypes, venv' 2>/dev/null; then
  echo "$exe"
  exit 0
fi

log() { echo "build-python: $*" >&2; }
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

# 1. Debian's source for pythonVERSION (trixie): a deb-src entry, then `apt-get source`.
src_root=$root/src
mkdir -p "$src_root"
srcdir=$(find "$src_root" -maxdepth 1 -type d -name "python$version-$version.*" | sort | tail -n 1)
if [ -z "$srcdir" ]; then
  if ! apt-cache showsrc "python$version" 2>/dev/null | grep -q '^Package:'; then
    list=/etc/apt/sources.list.d/kameo-trixie-src.sources
    if [ ! -f "$list" ]; then
      log "adding a deb-src entry for trixie ($list)"
      $sudo tee "$list" >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    $sudo apt-get update -q >&2
  fi
fi

# 2. What the build needs (Debian's -dev packages of the modules users expect).
deps="dpkg-dev build-essential pkg-config libssl-dev zlib1g-dev libbz2-dev libreadline-dev
  libsqlite3-dev libffi-dev liblzma-dev uuid-dev libgdbm-dev libncurses-dev libexpat1-dev"
missing=""
for p in $deps; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  log "installing build dependencies:$missing"
  $sudo apt-get install -y -q --no-install-recommends $missing >&2
fi

if [ -z "$srcdir" ]; then
  log "fetching Debian's python$version source"
  (cd "$src_root" && apt-get source -q "python$version" >&2)
  srcdir=$(find "$src_root" -maxdepth 1 -type d -name "python$version-$version.*" | sort | tail -n 1)
  [ -n "$srcdir" ] || { log "apt-get source python$version gave no source tree"; exit 1; }
fi
# Build from the package's upstream tarball (its .orig.tar.xz), without Debian's patches: they
# fit CPython to Debian's system layout (dist-packages, python3.13 paths without the
# free-threaded "t"), under which a free-threaded venv gets its pip where it cannot import it.
orig=$(find "$src_root" -maxdepth 1 -name "python${version}_$version.*.orig.tar.xz" | sort | tail -n 1)
[ -n "$orig" ] || { log "no upstream tarball (.orig.tar.xz) beside $srcdir"; exit 1; }
upstream=$src_root/upstream-$(basename "$orig" .orig.tar.xz)
if [ ! -x "$upstream/configure" ]; then
  rm -rf "$upstream" "$upstream.tmp"
  mkdir -p "$upstream.tmp"
  tar -xJf "$orig" -C "$upstream.tmp" --strip-components=1
  mv "$upstream.tmp" "$upstream"
fi
srcdir=$upstream

# 3. Configure and build out of tree (one source tree serves both builds), install aside, then
#    move into place, so an interrupted build leaves nothing that looks finished.
build=$root/build-$tag
rm -rf "$build" "$prefix.tmp"
mkdir -p "$build"
flags=(--prefix="$prefix" --with-ensurepip=no --disable-test-modules)
[ "$gil" = no ] && flags+=(--disable-gil)
log "configuring $tag in $build (${flags[*]})"
(cd "$build" && "$srcdir/configure" "${flags[@]}" >configure.log 2>&1) ||
  { tail -n 40 "$build/configure.log" >&2; exit 1; }
log "building $tag (make -j$(nproc)); the log is $build/make.log"
(cd "$build" && make -j"$(nproc)" >make.log 2>&1) || { tail -n 60 "$build/make.log" >&2; exit 1; }
(cd "$build" && make install DESTDIR="$prefix.tmp" >install.log 2>&1) ||
  { tail -n 40 "$build/install.log" >&2; exit 1; }
rm -rf "$prefix"
mv "$prefix.tmp$prefix" "$prefix"
rm -rf "$prefix.tmp" "$build"
[ -x "$exe" ] || { log "no $exe after the install"; exit 1; }
"$exe" -c 'import ssl, sqlite3, ctypes, venv' ||
  { rm -rf "$prefix"; log "$exe lacks a standard module"; exit 1; }
# kameo only needs pip inside virtual environments (ensurepip seeds it from the bundled wheel).
check=$(mktemp -d)
"$exe" -m venv "$check/venv" && "$check/venv/bin/python" -m pip --version >/dev/null ||
  { rm -rf "$check" "$prefix"; log "$exe cannot make a virtual environment with pip"; exit 1; }
rm -rf "$check"
echo "$exe"
