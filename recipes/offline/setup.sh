#!/usr/bin/env bash
# System side of the offline corpus: installs the Debian packages it is made from and keeps a copy of apt's
# package-description translations (the parallel text).
#   recipes/offline/setup.sh [TRANSLATIONS_DIR]      (default: data/offline_src/translations)
# Uses sudo when not root. Idempotent: installed packages and an existing copy are kept.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${1:-$repo/data/offline_src/translations}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# speech: real prompts at 8 kHz (wav) and 16 kHz (G.722) + transcripts/translations; TTS voices; word list
packages=(asterisk-core-sounds-en-wav asterisk-core-sounds-en-g722 asterisk-core-sounds-en asterisk-core-sounds-es
          flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts wamerican
          libsndfile1 python3-venv python3-dev build-essential)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
updated=0
if [ ${#missing[@]} -gt 0 ]; then
  echo "[offline setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# parallel text: Translation-en/-es/-de of Debian main, fetched by apt itself (Acquire::Languages)
langs=(en es de)
have_all=1
for l in "${langs[@]}"; do ls "$dest"/*Translation-"$l" >/dev/null 2>&1 || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "[offline setup] translations already in $dest"
  exit 0
fi
lists=/var/lib/apt/lists
find_lists() { ls "$lists"/*_main_i18n_Translation-"$1"* 2>/dev/null | grep -v -e '\.diff' -e 'IndexDiff' || true; }
need_update=0
for l in "${langs[@]}"; do [ -n "$(find_lists "$l")" ] || need_update=1; done
if [ "$need_update" = 1 ]; then
  echo "[offline setup] apt-get update -o Acquire::Languages=en,es,de (package-description translations)"
  $SUDO apt-get update -qq -o Acquire::Languages=en,es,de
fi
mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for l in "${langs[@]}"; do
  files="$(find_lists "$l")"
  [ -n "$files" ] || { echo "[offline setup] no Translation-$l in $lists after apt-get update" >&2; exit 1; }
  for f in $files; do
    name="$(basename "$f")"; name="${name%.lz4}"; name="${name%.gz}"; name="${name%.xz}"; name="${name%.zst}"
    /usr/lib/apt/apt-helper cat-file "$f" > "$tmp/$name"   # apt's own reader handles every list compression
  done
done
mv "$tmp"/*Translation-* "$dest"/
echo "[offline setup] translations copied to $dest:"; ls -la "$dest" | grep Translation
