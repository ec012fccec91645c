# Sourced by the example scripts (which run with `set -euo pipefail`) before lib/build.sh.
# ensure_packages PKG...: installs from Debian what is missing of the build's packages and of PKG...
# (with sudo when not root).
ensure_packages() {
    local need=() pkg sudo=
    for pkg in libsodium-dev zlib1g-dev libqrencode-dev pkg-config "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -eq 0 ]; then return 0; fi
    echo "== installing ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}
