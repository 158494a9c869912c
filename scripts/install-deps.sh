#!/bin/sh
# Installs everything moongate needs to build, test and benchmark on a
# Debian 12 machine, as root. Idempotent: when every package is present it
# only checks and returns in about a second.
#
# llhttp is not packaged for Debian 12, so libllhttp9.2 and libllhttp-dev are
# taken from Debian 13 (trixie) through a separate, pinned source list that
# apt uses for this one download only; the machine's own sources are never
# touched. Both packages depend on libc6 alone.
set -eu

DEBIAN_PKGS="build-essential pkg-config git curl ca-certificates procps
libluajit2-5.1-dev libuv1-dev libssl-dev lua-cjson libhiredis-dev
libnghttp2-dev zlib1g-dev libbrotli-dev brotli redis-server lua-busted
wrk nginx-light python3 clang libclang-rt-14-dev prometheus chromium
nghttp2-client"
LLHTTP_PKGS="libllhttp9.2 libllhttp-dev"
TRIXIE_MIRROR="${MG_TRIXIE_MIRROR:-http://deb.debian.org/debian}"

missing=""
for p in $DEBIAN_PKGS $LLHTTP_PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages:$missing; run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

need_debian=""
for p in $missing; do
    case " $LLHTTP_PKGS " in *" $p "*) ;; *) need_debian="$need_debian $p" ;; esac
done
if [ -n "$need_debian" ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends $need_debian
    # Debian starts the services it installs; tests start their own.
    for svc in redis-server nginx prometheus; do
        if command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
        service "$svc" stop >/dev/null 2>&1 || true
    done
fi

if ! dpkg-query -W -f='${Status}' libllhttp-dev 2>/dev/null | grep -q 'ok installed'; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial" "$work/archives/partial"
    echo "deb $TRIXIE_MIRROR trixie main" > "$work/trixie.list"
    opts="-o Dir::Etc::SourceList=$work/trixie.list -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists=$work/lists -o Dir::Cache::Archives=$work/archives
          -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root"
    # shellcheck disable=SC2086
    apt-get $opts update -q
    (cd "$work" && apt-get $opts download $LLHTTP_PKGS)
    dpkg -i "$work"/libllhttp*.deb
fi
echo "install-deps: all dependencies present"
