#!/usr/bin/env bash
# Install the Autobahn test suite (wstest) into <repo>/.cache/wstest.
#
# autobahntestsuite needs Python 2.7, which Debian 12 no longer packages, so
# this script:
#   1. downloads the Python 2.7 runtime packages of Debian 11 (bullseye) with
#      apt-get, using a private source list / list dir (the system's apt state
#      is not touched) and unpacks them with `dpkg -x` into <cache>/py27;
#   2. bootstraps pip/setuptools/wheel for Python 2.7 from wheels fetched by
#      the machine's python3 pip;
#   3. installs autobahntestsuite (and its C extensions, e.g. wsaccel) with
#      that pip into <cache>/site.
#
# Idempotent: once installed, a second run returns at once.
# Usage: tests/conformance/install_wstest.sh [--force]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
CACHE="${WSTEST_CACHE:-$REPO/.cache/wstest}"

ATS_VERSION="25.10.1"
STAMP="$CACHE/.installed-autobahntestsuite-$ATS_VERSION"
PY27="$CACHE/py27"
SITE="$CACHE/site"
PYBIN="$PY27/usr/bin/python2.7"

if [[ "${1:-}" == "--force" ]]; then
    rm -f "$STAMP"
elif [[ -f "$STAMP" && -x "$PYBIN" && -d "$SITE/autobahntestsuite" ]]; then
    exit 0
fi

mkdir -p "$CACHE"
# Serialise concurrent installs (e.g. several wrappers started at once).
exec 9>"$CACHE/.lock"
flock 9
if [[ -f "$STAMP" && -x "$PYBIN" && -d "$SITE/autobahntestsuite" ]]; then
    exit 0
fi

log() { echo "install_wstest: $*" >&2; }

# ---------------------------------------------------------------- step 1: py27
DEBS=(python2.7 python2.7-minimal libpython2.7-stdlib libpython2.7-minimal
      libpython2.7 python2.7-dev libpython2.7-dev libssl1.1 libffi7)
DEBDIR="$CACHE/debs"
APTDIR="$CACHE/apt"

have_all_debs() {
    local p
    for p in "${DEBS[@]}"; do
        compgen -G "$DEBDIR/${p}_*.deb" >/dev/null || return 1
    done
}

# Print "URI<TAB>Signed-By" of the main Debian archive configured on this
# machine (deb822 file first, then one-line sources.list format).
find_debian_uri() {
    local f="/etc/apt/sources.list.d/debian.sources"
    if [[ -n "${WSTEST_DEBIAN_URI:-}" ]]; then
        printf '%s\t%s\n' "$WSTEST_DEBIAN_URI" ""
        return
    fi
    if [[ -r "$f" ]]; then
        # Stanzas are separated by blank lines; skip the security archive.
        awk 'BEGIN { RS = ""; FS = "\n" }
             {
               uri = ""; suites = ""; key = ""
               for (i = 1; i <= NF; i++) {
                 if ($i ~ /^URIs:/)      { split($i, a, /[ \t]+/); uri = a[2] }
                 if ($i ~ /^Suites:/)    { suites = $i }
                 if ($i ~ /^Signed-By:/) { split($i, b, /[ \t]+/); key = b[2] }
               }
               if (uri != "" && suites !~ /security/) { print uri "\t" key; exit }
             }' "$f"
        return
    fi
    if [[ -r /etc/apt/sources.list ]]; then
        awk '$1 == "deb" && $0 !~ /security/ {
               for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i "\t"; exit }
             }' /etc/apt/sources.list
    fi
}

if ! have_all_debs; then
    IFS=$'\t' read -r URI KEY < <(find_debian_uri) || true
    if [[ -z "${URI:-}" ]]; then
        log "cannot find a Debian archive URI in /etc/apt (set WSTEST_DEBIAN_URI)"
        exit 1
    fi
    if [[ -z "${KEY:-}" && -r /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
        KEY=/usr/share/keyrings/debian-archive-keyring.gpg
    fi
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$DEBDIR"
    {
        echo "Types: deb"
        echo "URIs: $URI"
        echo "Suites: bullseye"
        echo "Components: main"
        if [[ -n "$KEY" ]]; then echo "Signed-By: $KEY"; else echo "Trusted: yes"; fi
    } > "$APTDIR/bullseye.sources"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APTDIR/bullseye.sources"
              -o "Dir::Etc::SourceParts=/dev/null"
              -o "Dir::State::Lists=$APTDIR/lists"
              -o "Dir::Cache=$APTDIR/cache"
              -o "APT::Sandbox::User=root")
    log "apt-get update (private bullseye list, $URI)"
    apt-get -q "${APT_OPTS[@]}" update >&2
    log "apt-get download ${DEBS[*]}"
    (cd "$DEBDIR" && apt-get -q "${APT_OPTS[@]}" download "${DEBS[@]}" >&2)
    have_all_debs || { log "download incomplete"; exit 1; }
fi

if [[ ! -x "$PYBIN" ]]; then
    log "extracting Python 2.7 into $PY27"
    rm -rf "$PY27.tmp"
    mkdir -p "$PY27.tmp"
    for deb in "$DEBDIR"/*.deb; do
        dpkg -x "$deb" "$PY27.tmp"
    done
    rm -rf "$PY27"
    mv "$PY27.tmp" "$PY27"
fi

py27() {
    env -u PYTHONPATH -u PYTHONSTARTUP -u PYTHONUSERBASE \
        PYTHONHOME="$PY27/usr" \
        LD_LIBRARY_PATH="$PY27/usr/lib/x86_64-linux-gnu" \
        "$PYBIN" "$@"
}
py27 -c 'import ssl, zlib, ctypes, hashlib' \
    || { log "the extracted Python 2.7 does not work"; exit 1; }

# ------------------------------------------------------- step 2: pip for py27
WHEELS="$CACHE/wheels"
TOOLS="$CACHE/tools"
PIP_WHL="$WHEELS/pip-20.3.4-py2.py3-none-any.whl"
if [[ ! -f "$PIP_WHL" || ! -f "$WHEELS/setuptools-44.0.0-py2.py3-none-any.whl" \
      || ! -f "$WHEELS/wheel-0.37.1-py2.py3-none-any.whl" ]]; then
    log "downloading pip/setuptools/wheel wheels for Python 2.7"
    mkdir -p "$WHEELS"
    python3 -m pip download -q --disable-pip-version-check -d "$WHEELS" \
        --python-version 2.7 --only-binary=:all: --no-deps \
        pip==20.3.4 setuptools==44.0.0 wheel==0.37.1 >&2
fi
if [[ ! -d "$TOOLS/pip" ]]; then
    log "bootstrapping pip into $TOOLS"
    rm -rf "$TOOLS"
    py27 "$PIP_WHL/pip" install -q --disable-pip-version-check --no-index \
        --target "$TOOLS" "$WHEELS"/*.whl >&2
fi

# ------------------------------------------- step 3: autobahntestsuite itself
log "installing autobahntestsuite==$ATS_VERSION into $SITE"
rm -rf "$SITE"
INC="$PY27/usr/include"
CFLAGS="-I$INC -I$INC/python2.7 -I$INC/x86_64-linux-gnu/python2.7 ${CFLAGS:-}" \
LDFLAGS="-L$PY27/usr/lib/x86_64-linux-gnu ${LDFLAGS:-}" \
    env -u PYTHONSTARTUP -u PYTHONUSERBASE \
    PYTHONHOME="$PY27/usr" \
    LD_LIBRARY_PATH="$PY27/usr/lib/x86_64-linux-gnu" \
    PYTHONPATH="$TOOLS" \
    "$PYBIN" -m pip install -q --disable-pip-version-check --no-warn-script-location \
        --cache-dir "$CACHE/pip-cache" --target "$SITE" \
        "autobahntestsuite==$ATS_VERSION" >&2

py27 -c "import site; site.addsitedir('$SITE'); import wsaccel.utf8validator; from autobahntestsuite import wstest" \
    || { log "autobahntestsuite does not import"; exit 1; }

touch "$STAMP"
log "done: run $SCRIPT_DIR/wstest"
