#!/usr/bin/env bash
# Mirror a source folder into a persistent build tree, touching only files whose content
# differs, so that make/ninja in a cached CMake build dir recompile only what changed (copying
# everything would give every file a new timestamp and recompile all of it). New files are
# added, files gone from the source are deleted. Sourced by tools/build_wheel.sh
# (install_if_changed, sync_dir; both add to $changed_files); run directly it syncs SRC into DST
# and prints how many files it wrote or deleted.
#
# Usage: bash tools/sync_tree.sh SRC DST
changed_files=${changed_files:-0}

install_if_changed() {  # SRC (or - for stdin) DST: write DST only when its content differs
  local tmp
  if [[ "$1" == - ]]; then tmp="$(mktemp)"; cat >"$tmp"; else tmp="$1"; fi
  if ! cmp -s "$tmp" "$2"; then
    mkdir -p "$(dirname "$2")"
    cp "$tmp" "$2.tmp.$$" && mv "$2.tmp.$$" "$2"
    changed_files=$((changed_files + 1))
  fi
  if [[ "$1" == - ]]; then rm -f "$tmp"; fi
  return 0
}

sync_dir() {  # SRC DST: make DST hold exactly SRC's files (no __pycache__/*.pyc), nothing else
  local rel
  [[ -d "$1" ]] || { echo "sync_tree.sh: no folder $1" >&2; return 1; }
  mkdir -p "$2"
  while IFS= read -r -d '' rel; do
    install_if_changed "$1/$rel" "$2/$rel"
  done < <(cd "$1" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -printf '%P\0')
  while IFS= read -r -d '' rel; do
    if [[ ! -f "$1/$rel" || "$rel" == *.pyc || "$rel" == */__pycache__/* ]]; then
      rm -f "$2/$rel"
      changed_files=$((changed_files + 1))
    fi
  done < <(cd "$2" && find . -type f -printf '%P\0')
  find "$2" -mindepth 1 -type d -empty -delete
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  [[ $# == 2 ]] || { echo "usage: bash tools/sync_tree.sh SRC DST" >&2; exit 2; }
  sync_dir "$1" "$2"
  echo "$changed_files"
fi
