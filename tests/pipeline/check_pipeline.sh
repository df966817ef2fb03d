#!/usr/bin/env bash
# Runs samples/pipeline twice (make -j2) into two scratch directories and checks what a Makefile
# relies on: both runs succeed, every adapter and checkpoint they write is byte-identical, a
# second `make` in the same directory runs no tool, and touching one input redoes only the
# steps that depend on it.
#
#   check_pipeline.sh BIN_DIR SOURCE_DIR
set -euo pipefail
bin=$1
source=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "check_pipeline: $*" >&2; exit 1; }
run() { make --no-print-directory -C "$source/samples/pipeline" -j2 LORAKIT="$bin" OUT="$1" "${@:2}"; }

run "$tmp/a" > "$tmp/a.log" 2>&1 || { cat "$tmp/a.log"; fail "the first run failed"; }
run "$tmp/b" > "$tmp/b.log" 2>&1 || { cat "$tmp/b.log"; fail "the second run failed"; }
count=0
while IFS= read -r file; do
  cmp -s "$tmp/a/$file" "$tmp/b/$file" || fail "$file differs between two identical runs"
  count=$((count + 1))
done < <(cd "$tmp/a" && find . -type f \( -name '*.safetensors' -o -name 'adapter_config.json' \) | sort)
[ "$count" -ge 10 ] || fail "only $count outputs compared"

run "$tmp/a" > "$tmp/again.log" 2>&1
if grep -q 'lora-' "$tmp/again.log"; then cat "$tmp/again.log"; fail "a second make ran tools again"; fi

# Touch a copy of one input (the committed samples stay untouched): only its chain reruns.
cp -r "$source/samples/pipeline/adapters" "$tmp/adapters"
make --no-print-directory -C "$source/samples/pipeline" LORAKIT="$bin" OUT="$tmp/c" \
  input_tone="$tmp/adapters/tone/adapters.safetensors" path_tone="$tmp/adapters/tone" > "$tmp/c.log" 2>&1 ||
  { cat "$tmp/c.log"; fail "the run over copied inputs failed"; }
sleep 1
touch "$tmp/adapters/tone/adapters.safetensors"
make --no-print-directory -C "$source/samples/pipeline" LORAKIT="$bin" OUT="$tmp/c" \
  input_tone="$tmp/adapters/tone/adapters.safetensors" path_tone="$tmp/adapters/tone" > "$tmp/touched.log" 2>&1
grep -q 'lora-convert .*tone' "$tmp/touched.log" || fail "touching tone did not reconvert it"
if grep -q 'lora-convert .*style\|lora-convert .*detail' "$tmp/touched.log"; then
  cat "$tmp/touched.log"; fail "touching tone reconverted the others"
fi
echo "pipeline: $count outputs byte-identical across runs; incremental rebuilds ok"
