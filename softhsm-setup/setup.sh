#!/usr/bin/env bash
# softhsm-setup/setup.sh: idempotent SoftHSM2 set-up for keyward (development, tests, CI).
#
# Installs what is missing (softhsm2, protoc, libssl-dev, pkg-config, gcc), creates
# STATE_DIR/tokens, writes STATE_DIR/softhsm2.conf and initialises a token BY LABEL.
# Stdout carries only `export ...` lines, so:   eval "$(softhsm-setup/setup.sh state)"
# Everything else (apt, progress) goes to stderr.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: softhsm-setup/setup.sh STATE_DIR
       softhsm-setup/setup.sh --install-only
       softhsm-setup/setup.sh --dev
       softhsm-setup/setup.sh --help

--install-only does step 1 alone (what the build, the demo and the tests need
installed); the demo and the tests then make their own state directories and tokens.
--dev does step 1, also installs g++ (libFuzzer is C++), then installs cargo-fuzz
with `cargo install cargo-fuzz --locked` when missing (what fuzz/smoke.sh needs).

Idempotent SoftHSM2 set-up for keyward. Safe to run again: a second run changes nothing.

  1. Installs with apt-get, only when missing: softhsm2, protobuf-compiler (protoc),
     libssl-dev, pkg-config, gcc (via sudo when not root; `apt-get update` at most once).
  2. Creates STATE_DIR/tokens (0700) and writes STATE_DIR/softhsm2.conf from
     pkcs11-config/softhsm2.conf.template (left untouched when already up to date).
  3. Initialises a token labelled $KEYWARD_TOKEN_LABEL (default "keyward") unless a token
     with that label already exists. Tokens are found by label, never by slot number.

Environment:
  KEYWARD_TOKEN_LABEL   token label, 1-32 bytes (default: keyward)
  KEYWARD_SO_PIN        security-officer PIN (4-255 characters); if unset, a random one is
                        generated once into STATE_DIR/so.pin (0600) and reused afterwards
  KEYWARD_USER_PIN      user PIN; if unset, generated once into STATE_DIR/user.pin (0600)
                        Generated PIN files are for DEVELOPMENT only.

Output (stdout), one line each, ready for eval:
  export SOFTHSM2_CONF=STATE_DIR/softhsm2.conf
  export KEYWARD_STATE=STATE_DIR                    (the example appliance.toml's state directory)
  export KEYWARD_PKCS11_MODULE=/path/to/libsofthsm2.so
  export KEYWARD_TOKEN_LABEL=LABEL
  export KEYWARD_USER_PIN_FILE=STATE_DIR/user.pin   (omitted when KEYWARD_USER_PIN is set)

Example:
  eval "$(softhsm-setup/setup.sh ./state)"
EOF
}

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

INSTALL_ONLY=0
DEV=0
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --install-only) INSTALL_ONLY=1; shift; [ "$#" -eq 0 ] || { usage >&2; exit 2; } ;;
    --dev) INSTALL_ONLY=1; DEV=1; shift; [ "$#" -eq 0 ] || { usage >&2; exit 2; } ;;
    "") usage >&2; exit 2 ;;
    -*) printf 'setup.sh: unknown option: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
esac
[ "$INSTALL_ONLY" -eq 1 ] || [ "$#" -eq 1 ] || { usage >&2; exit 2; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
TEMPLATE="$REPO_ROOT/pkcs11-config/softhsm2.conf.template"

# ---------------------------------------------------------------- 1. packages
MODULE_CANDIDATES=(
    /usr/lib/softhsm/libsofthsm2.so
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so
)

find_module() {
    local m
    for m in "${MODULE_CANDIDATES[@]}"; do
        if [ -f "$m" ]; then printf '%s\n' "$m"; return 0; fi
    done
    if command -v dpkg >/dev/null 2>&1; then
        m=$(dpkg -L libsofthsm2 2>/dev/null | grep '/libsofthsm2\.so$' | head -n 1 || true)
        if [ -n "$m" ] && [ -f "$m" ]; then printf '%s\n' "$m"; return 0; fi
    fi
    return 1
}

dpkg_installed() {
    command -v dpkg-query >/dev/null 2>&1 &&
        [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# Sets the array `missing` to the Debian packages whose files are absent.
compute_missing() {
    missing=()
    if ! command -v softhsm2-util >/dev/null 2>&1 || ! find_module >/dev/null; then
        missing+=(softhsm2)
    fi
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    # libssl-dev: the package, or at least OpenSSL headers that pkg-config can find.
    if ! dpkg_installed libssl-dev; then
        if ! { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl 2>/dev/null; }; then
            missing+=(libssl-dev)
        fi
    fi
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    if [ "$DEV" -eq 1 ]; then command -v c++ >/dev/null 2>&1 || missing+=(g++); fi
}

# --dev: cargo-fuzz (for fuzz/), installed from crates.io only when missing. Cargo's
# output goes to stderr like the rest.
install_dev_tools() {
    if cargo fuzz --version >/dev/null 2>&1; then
        log "cargo-fuzz present ($(cargo fuzz --version 2>/dev/null))"
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust first"
    log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked >&2
}

compute_missing
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing missing packages: ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these packages by hand: ${missing[*]}"
    SUDO=()
    if [ "$EUID" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "not root and sudo not found; install: ${missing[*]}"
        SUDO=(sudo)
    fi
    # `env` so the variable survives sudo's environment reset.
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq update >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -y -qq install --no-install-recommends "${missing[@]}" >&2
    compute_missing
    [ "${#missing[@]}" -eq 0 ] || die "still missing after apt-get install: ${missing[*]}"
fi

MODULE=$(find_module) || die "libsofthsm2.so not found (is the softhsm2 package installed?)"
command -v softhsm2-util >/dev/null 2>&1 || die "softhsm2-util not found"
if [ "$INSTALL_ONLY" -eq 1 ]; then
    log "prerequisites present (module $MODULE)"
    [ "$DEV" -eq 0 ] || install_dev_tools
    exit 0
fi

# ---------------------------------------------------------------- 2. state dir + conf
STATE_ARG=$1
case "$STATE_ARG" in *$'\n'*) die "STATE_DIR must not contain a newline" ;; esac
if [ ! -d "$STATE_ARG" ]; then
    mkdir -p -- "$STATE_ARG"
    chmod 0700 -- "$STATE_ARG"
fi
STATE_DIR=$(cd -- "$STATE_ARG" && pwd -P)
TOKEN_DIR="$STATE_DIR/tokens"
CONF="$STATE_DIR/softhsm2.conf"

if [ ! -d "$TOKEN_DIR" ]; then
    mkdir -- "$TOKEN_DIR"
    log "created $TOKEN_DIR"
fi
[ "$(stat -c %a -- "$TOKEN_DIR")" = 700 ] || chmod 0700 -- "$TOKEN_DIR"

[ -f "$TEMPLATE" ] || die "template not found: $TEMPLATE"
template=$(cat -- "$TEMPLATE")
# Quoted replacement: bash 5.2 would otherwise treat '&' in the path specially.
conf_text="${template//@TOKEN_DIR@/"$TOKEN_DIR"}"
if [ ! -f "$CONF" ] || [ "$(cat -- "$CONF")" != "$conf_text" ]; then
    tmp=$(mktemp "$STATE_DIR/.softhsm2.conf.XXXXXX")
    printf '%s\n' "$conf_text" >"$tmp"
    chmod 0644 -- "$tmp"
    mv -f -- "$tmp" "$CONF"
    log "wrote $CONF"
fi
export SOFTHSM2_CONF="$CONF"

# ---------------------------------------------------------------- 3. token by label
LABEL=${KEYWARD_TOKEN_LABEL:-keyward}
label_bytes=$(printf '%s' "$LABEL" | wc -c)
[ "$label_bytes" -ge 1 ] && [ "$label_bytes" -le 32 ] || die "KEYWARD_TOKEN_LABEL must be 1-32 bytes"
case "$LABEL" in *[![:print:]]* | " "* | *" ") die "KEYWARD_TOKEN_LABEL must be printable, without leading/trailing spaces" ;; esac

# True if softhsm2-util lists an initialised token whose label is exactly $LABEL.
token_exists() {
    local slots
    slots=$(softhsm2-util --show-slots 2>/dev/null) || die "softhsm2-util --show-slots failed (SOFTHSM2_CONF=$CONF)"
    printf '%s\n' "$slots" | LABEL="$LABEL" awk '
        /^[[:space:]]*Label:/ {
            v = $0
            sub(/^[[:space:]]*Label:[[:space:]]*/, "", v)
            sub(/[[:space:]]+$/, "", v)
            if (v == ENVIRON["LABEL"]) found = 1
        }
        END { exit found ? 0 : 1 }'
}

# Prints the PIN: from the environment variable if set, else from the file
# (generated once, mode 0600). With "existing-only", never generates.
get_pin() {
    local var=$1 file=$2 mode=$3 pin
    pin=${!var:-}
    if [ -n "$pin" ]; then
        printf '%s' "$pin"
        return 0
    fi
    if [ ! -f "$file" ]; then
        [ "$mode" = generate ] || die "token '$LABEL' already exists but $file is missing; set $var or remove $TOKEN_DIR"
        local tmp new
        new=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
        [ "${#new}" -eq 16 ] || die "could not generate a PIN from /dev/urandom"
        tmp=$(umask 077 && mktemp "$STATE_DIR/.pin.XXXXXX")
        printf '%s' "$new" >"$tmp"
        chmod 0600 -- "$tmp"
        mv -f -- "$tmp" "$file"
        log "generated development PIN file $file"
    fi
    [ "$(stat -c %a -- "$file")" = 600 ] || chmod 0600 -- "$file"
    pin=$(tr -d ' \t\r\n' <"$file")
    [ -n "$pin" ] || die "$file is empty"
    printf '%s' "$pin"
}

check_pin_length() {
    [ "${#2}" -ge 4 ] && [ "${#2}" -le 255 ] || die "$1 must be 4-255 characters"
}

if token_exists; then
    mode=existing-only
else
    mode=generate
fi
# Make sure the user PIN is available (and PIN files exist) in both cases.
USER_PIN=$(get_pin KEYWARD_USER_PIN "$STATE_DIR/user.pin" "$mode")
check_pin_length "user PIN" "$USER_PIN"

if [ "$mode" = generate ]; then
    SO_PIN=$(get_pin KEYWARD_SO_PIN "$STATE_DIR/so.pin" generate)
    check_pin_length "SO PIN" "$SO_PIN"
    log "initialising token '$LABEL' in $TOKEN_DIR"
    # Development PINs on softhsm2-util's argv are acceptable (the tokens are throw-away).
    softhsm2-util --init-token --free --label "$LABEL" --so-pin "$SO_PIN" --pin "$USER_PIN" >&2
    token_exists || die "token '$LABEL' not listed after initialisation"
else
    log "token '$LABEL' already initialised; nothing to do"
fi

# ---------------------------------------------------------------- 4. exports
printf 'export SOFTHSM2_CONF=%q\n' "$CONF"
# The example appliance.toml finds the PIN file, PKI and audit directory under it.
printf 'export KEYWARD_STATE=%q\n' "$STATE_DIR"
printf 'export KEYWARD_PKCS11_MODULE=%q\n' "$MODULE"
printf 'export KEYWARD_TOKEN_LABEL=%q\n' "$LABEL"
if [ -z "${KEYWARD_USER_PIN:-}" ]; then
    printf 'export KEYWARD_USER_PIN_FILE=%q\n' "$STATE_DIR/user.pin"
fi
