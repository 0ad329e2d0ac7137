# Shared by scripts/ensure-services and scripts/ensure-browser (sourced, not run): messages,
# root commands and a Debian/Ubuntu package install that never prompts (CI has no stdin).
# The sourcing script sets SCRIPT_NAME (the message prefix) and HOWTO (what a person should run
# when this script cannot install something itself).

say() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { say "$*"; exit 1; }

# Root commands run directly as root, else through passwordless sudo (never prompts).
can_root() { [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
can_apt_install() { command -v apt-get >/dev/null 2>&1 && can_root; }

# Another apt-get or an unattended upgrade may hold the dpkg lock: wait for it, do not fail.
APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=300)
APT_UPDATED=0
# apt_install [apt-get options] package...: dies with $HOWTO where it cannot install.
apt_install() {
    can_apt_install || die "cannot install $* (needs apt-get and root or passwordless sudo); $HOWTO"
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        as_root apt-get "${APT_LOCK_WAIT[@]}" update -q >/dev/null
        APT_UPDATED=1
    fi
    say "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK_WAIT[@]}" install -y -q "$@" >/dev/null
}
