#!/usr/bin/env bash
# Installs what the tests need (real Nix for the end-to-end tests, systemd-analyze for the unit
# checks, mount/unshare/ip for the namespaced tests), then runs them. As root it installs with apt-get; otherwise it says what is missing
# and stops, so a missing prerequisite never looks like a failing test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nix-build >/dev/null 2>&1 || need+=(nix-bin)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v mount >/dev/null 2>&1 || need+=(mount)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
[ "$(id -u)" != 0 ] || command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ "$(id -u)" != 0 ] || command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "the tests need: ${need[*]} (Debian/Ubuntu: sudo apt-get install -y ${need[*]})" >&2
    exit 2
  fi
fi

# Current Nix (Debian trixie's nix-bin, 2.26) as the second client: a minimal root of its own,
# made once (about 40 s, 230 MB) outside the repository and kept between runs.
if [ "$(id -u)" = 0 ]; then
  nix226="${NIX_SIDECAR_NIX226_ROOT:-/var/tmp/nix-sidecar-nix226}"
  if [ ! -x "$nix226/usr/bin/nix" ]; then
    echo "making a Debian trixie root with current Nix in $nix226" >&2
    for attempt in 1 2; do
      rm -rf "$nix226.new"
      if mmdebstrap --quiet --variant=apt --include=nix-bin,ca-certificates trixie "$nix226.new"; then
        break
      fi
      [ "$attempt" = 2 ] && { echo "could not make the Nix 2.26 root" >&2; exit 2; }
      echo "mmdebstrap failed; trying once more" >&2
    done
    rm -rf "$nix226" && mv "$nix226.new" "$nix226"
  fi
  export NIX_SIDECAR_NIX226_ROOT="$nix226"
fi

# As root, the tests run in a private network namespace with only loopback up: every test
# double is on 127.0.0.1/::1, and this makes certain that no test (or a daemon it starts with
# a metadata variable missed) can send a packet anywhere else. Built first, with the network.
if [ "$(id -u)" = 0 ] && unshare --net true 2>/dev/null; then
  cargo test --locked --no-run "$@"
  echo "running the tests in a private network namespace (loopback only)" >&2
  exec unshare --net sh -c 'ip link set lo up && exec cargo test --locked --offline "$@"' sh "$@"
fi
cargo test --locked "$@"
