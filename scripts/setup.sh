#!/usr/bin/env bash
# Installs what building and testing moemesh needs on a fresh Debian machine, and nothing that
# is already there. Idempotent; safe to run before every build.
#   scripts/setup.sh          build prerequisites (C/C++ compiler, protoc for etcd-client)
#   scripts/setup.sh --test   the above plus what the tests need (etcd-server; promtool, from
#                             Debian's prometheus package, checks deploy/prometheus/)
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
# etcd-client compiles etcd's protos with protoc (moemesh's own protos use protox, pure Rust).
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if (( want_test )); then
  # The mesh tests start a real etcd server on free loopback ports.
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  # promtool checks and unit-tests the alert rules in deploy/prometheus/.
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
fi

if (( ${#missing[@]} )); then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install a Rust toolchain (1.90 or newer), e.g. from https://rustup.rs" >&2
  exit 1
fi
