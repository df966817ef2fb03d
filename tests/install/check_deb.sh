#!/usr/bin/env bash
# Builds the Debian package with CPack and checks it without installing it system-wide: its
# files (tools, versioned library, headers, CMake/pkg-config files, man pages, completion), its
# declared dependencies (from dpkg-shlibdeps), and that the tools run from an unpacked root.
#
#   check_deb.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "check_deb: $*" >&2; exit 1; }
command -v dpkg-deb > /dev/null || { echo "dpkg-deb not available: skipped"; exit 0; }

(cd "$tmp" && cpack -G DEB --config "$build/CPackConfig.cmake" -B "$tmp/out" > "$tmp/cpack.log" 2>&1) ||
  { cat "$tmp/cpack.log"; fail "cpack failed"; }
deb=$(find "$tmp/out" -maxdepth 1 -name 'lorakit_*.deb' | head -n 1)
[ -n "$deb" ] || fail "no .deb produced"

contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/lora-extract ./usr/bin/lora-bake ./usr/include/lorakit/adapter.h \
            ./usr/share/man/man1/lora-stack.1 ./usr/share/bash-completion/completions/lora-merge; do
  grep -q " $path\$" <<< "$contents" || fail "$path is not in the package"
done
grep -Eq 'usr/lib/[^ ]*liblorakit\.so\.0 ' <<< "$contents" || fail "no liblorakit.so.0 in the package"
grep -q 'lorakitConfig.cmake' <<< "$contents" || fail "no CMake package config in the package"
grep -q 'pkgconfig/lorakit.pc' <<< "$contents" || fail "no pkg-config file in the package"

depends=$(dpkg-deb -f "$deb" Depends)
for library in libopenblas liblapacke libfmt libc6 libstdc++6; do
  grep -q "$library" <<< "$depends" || fail "Depends lacks $library: $depends"
done

dpkg-deb -x "$deb" "$tmp/root"
"$tmp/root/usr/bin/lora-inspect" --version | grep -q '^lora-inspect (lorakit) ' || fail "the packaged lora-inspect does not run"
echo "$(basename "$deb"): ok; Depends: $depends"
