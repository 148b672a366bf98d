#!/usr/bin/env bash
# Builds etcd 3.4.23's own load generator (tools/benchmark) from Debian's
# packages, to check that tern-bench's client is not what limits etcd's
# figures: run both at the same load against the same etcd and compare.
#
# Debian's golang-etcd-server-dev ships etcd's Go packages but leaves
# tools/ out, so tools/benchmark comes from Debian's source package for the
# same version (fetched with a private apt list, /etc/apt untouched); every
# dependency comes from the installed golang-*-dev packages (GOPATH mode,
# no Go module proxy needed).
#
# Usage: bench/build-etcd-benchmark.sh [output path, default /tmp/etcd-benchmark]
set -euo pipefail
out="${1:-/tmp/etcd-benchmark}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq golang-go golang-etcd-server-dev

mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"
echo 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main' \
  > "$work/apt/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
apt-get "${apt_opts[@]}" update -qq
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only etcd=3.4.23-4)

mkdir -p "$work/gopath/src/go.etcd.io/etcd"
tar xzf "$work/src/etcd_3.4.23.orig.tar.gz" -C "$work/gopath/src/go.etcd.io/etcd" \
  --strip-components=1 etcd-3.4.23/tools/benchmark
(cd "$work" && GO111MODULE=off GOPATH="/usr/share/gocode:$work/gopath" GOCACHE="$work/gocache" \
  go build -o "$out" go.etcd.io/etcd/tools/benchmark)
echo "built $out"
