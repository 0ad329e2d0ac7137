# shellcheck shell=bash
# Shared by the scripts that make sure servers and tools are installed and running (sourced, not
# run): messages, root commands, a Debian/Ubuntu package install that never prompts (CI has no
# stdin), and waiting for a server to answer. Messages go to stderr prefixed with the calling
# script's name; a script may set HOWTO to the manual steps a person should take when it cannot
# install something itself.

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() {
    say "$*"
    exit 1
}

# Root commands run directly as root, else through passwordless sudo (never prompts).
can_root() { [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
can_apt_install() { command -v apt-get >/dev/null 2>&1 && can_root; }

# Another apt-get or an unattended upgrade may hold the dpkg lock: wait for it, do not fail.
APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=300)
APT_UPDATED=0
# apt_install [apt-get options] package...: dies with $HOWTO where it cannot install.
apt_install() {
    can_apt_install ||
        die "cannot install $* (needs apt-get and root or passwordless sudo); ${HOWTO:-install it yourself}"
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        as_root apt-get "${APT_LOCK_WAIT[@]}" update -q >/dev/null
        APT_UPDATED=1
    fi
    say "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK_WAIT[@]}" install -y -q "$@" >/dev/null
}

# Poll a probe every 0.5 s for at most $2 seconds, telling the user what we are waiting for.
wait_for() {
    local what=$1 secs=$2 i
    shift 2
    for ((i = 0; i < secs * 2; i++)); do
        "$@" && return 0
        if ((i % 10 == 0)); then say "waiting for $what (up to ${secs}s)..."; fi
        sleep 0.5
    done
    "$@"
}

tcp_open() { timeout 1 bash -c ": </dev/tcp/127.0.0.1/$1" 2>/dev/null; }
