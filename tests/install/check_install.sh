#!/usr/bin/env bash
# Installs the build into a scratch prefix and checks what a user gets: the tools (runnable
# from there), the library with its versioned SONAME, public headers only, man pages and
# bash completion, and samples/api built against the installed copy twice, with
# find_package(lorakit) and with pkg-config; both builds must write the same bytes.
#
#   check_install.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1
source=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"
fail() { echo "check_install: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" > "$tmp/install.log"

lib=$(find "$prefix" -name 'liblorakit.so.*.*.*' | head -n 1)
[ -n "$lib" ] || fail "no versioned liblorakit.so installed"
libdir=$(dirname "$lib")
[ -L "$libdir/liblorakit.so" ] || fail "no liblorakit.so development link"
soname=$(objdump -p "$lib" | awk '/SONAME/ {print $2}')
[ "$soname" = "liblorakit.so.0" ] || fail "SONAME is '$soname', expected liblorakit.so.0"
[ -f "$libdir/cmake/lorakit/lorakitConfig.cmake" ] || fail "no CMake package config"
[ -f "$libdir/pkgconfig/lorakit.pc" ] || fail "no pkg-config file"

for tool in lora-inspect lora-resize lora-merge lora-convert lora-stack lora-bake lora-extract; do
  [ -x "$prefix/bin/$tool" ] || fail "$tool not installed"
  "$prefix/bin/$tool" --version | grep -q "^$tool (lorakit) " || fail "$tool --version from the prefix"
  man="$prefix/share/man/man1/$tool.1"
  [ -f "$man" ] || fail "no man page for $tool"
  head -n 1 "$man" | grep -q '^\.TH ' || fail "$man is not a man page"
  grep -q -- '--help' "$man" || fail "$man lacks the --help text"
  completion="$prefix/share/bash-completion/completions/$tool"
  [ -f "$completion" ] || fail "no bash completion for $tool"
  bash -c "source '$completion' && complete -p $tool" > /dev/null || fail "$completion does not register"
done
grep -q -- '--rank' "$prefix/share/bash-completion/completions/lora-extract" || fail "completion lacks --rank"

# Public headers only: nothing from lib/src or formats/src.
[ -f "$prefix/include/lorakit/adapter.h" ] && [ -f "$prefix/include/lorakit/version.h" ] &&
  [ -f "$prefix/include/lorakit/formats/builtin.h" ] || fail "public headers missing"
for internal in dtype_kernels.h parallel.h merge_math.h module_groups.h conventions.h writers.h \
    atomic_file.h sha256.h names.h random.h lycoris.h base_model.h gguf.h safetensors.h; do
  [ -z "$(find "$prefix/include" -name "$internal")" ] || fail "internal header $internal installed"
done
# The installed set is closed: every header compiles on its own against the installed copy.
for header in $(cd "$prefix/include" && find lorakit -name '*.h' | sort); do
  echo "#include \"$header\"" | g++ -std=c++20 -fsyntax-only -x c++ -I "$prefix/include" - 2> "$tmp/header.log" ||
    { cat "$tmp/header.log"; fail "installed header $header does not compile on its own"; }
done

adapter="$source/samples/kohya-sdxl.safetensors"

# 1. find_package(lorakit)
cmake -S "$source/samples/api" -B "$tmp/api-cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release \
  > "$tmp/configure.log" || { cat "$tmp/configure.log"; fail "find_package(lorakit) failed"; }
cmake --build "$tmp/api-cmake" > "$tmp/build.log" || { cat "$tmp/build.log"; fail "the example did not build (CMake)"; }
LD_LIBRARY_PATH="$libdir" "$tmp/api-cmake/lorakit-api-example" "$adapter" "$tmp/cmake.safetensors" | grep -q "wrote" ||
  fail "the CMake-built example failed"

# 2. pkg-config
flags=$(PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --cflags --libs lorakit) || fail "pkg-config --cflags --libs lorakit"
# shellcheck disable=SC2086
g++ "$source/samples/api/main.cpp" $flags -o "$tmp/api-pkgconfig" || fail "the example did not build (pkg-config)"
LD_LIBRARY_PATH="$libdir" "$tmp/api-pkgconfig" "$adapter" "$tmp/pkgconfig.safetensors" | grep -q "wrote" ||
  fail "the pkg-config-built example failed"

cmp -s "$tmp/cmake.safetensors" "$tmp/pkgconfig.safetensors" || fail "the two builds wrote different files"
"$prefix/bin/lora-inspect" "$tmp/cmake.safetensors" | grep -q "kohya" || fail "the installed lora-inspect cannot read the result"
echo "install, find_package and pkg-config: ok ($prefix)"
