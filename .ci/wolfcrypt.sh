#!/usr/bin/env bash
# Optional: wolfSSL's Python binding, so tests/delivery decrypts our model files with wolfSSL's own
# AES-GCM as well as with `cryptography`. PyPI has no wheel and its source build clones wolfSSL
# from GitHub; here it builds against the distribution's libwolfssl-dev instead. Best effort: the
# test skips where this fails.
set -uo pipefail
venv_pip="${1:-.venv/bin/pip}"
command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || exit 0
apt-get install -y -qq libwolfssl-dev >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libwolfssl-dev >/dev/null 2>&1; } || exit 0
version=$(dpkg-query -W -f='${Version}' libwolfssl-dev 2>/dev/null | cut -d- -f1)
lib=$(dirname "$(dpkg -L libwolfssl-dev | grep '/libwolfssl.so$' | head -1)")
prefix=$(mktemp -d)
mkdir -p "$prefix/lib" && ln -s /usr/include "$prefix/include"
ln -s "$lib/libwolfssl.so" "$prefix/lib/libwolfssl.so"
[ -e "$lib/libwolfssl.a" ] && ln -s "$lib/libwolfssl.a" "$prefix/lib/libwolfssl.a"
USE_LOCAL_WOLFSSL="$prefix" "$venv_pip" install -q "wolfcrypt==${version}.post0" >/dev/null 2>&1 \
  || USE_LOCAL_WOLFSSL="$prefix" "$venv_pip" install -q "wolfcrypt==${version}" >/dev/null 2>&1 \
  || echo "wolfcrypt not installed: the wolfSSL cross-check will skip"
