# Sourced by scripts/*: creates .venv on first use and installs the project into it.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

# The interpreter: $PYTHON if set; else, on Linux, the system's own python3 if it is 3.11
# or newer and can make a virtual environment (Debian's needs python3-venv); else python3
# on PATH. Distributions build their python3 with profile-guided and link-time
# optimisation, which a Python compiled without --enable-optimizations (pyenv's default)
# lacks: on the bench's machine the nodes and the import client used 11-15% less CPU
# under Debian's 3.11 than under pyenv's 3.11 (docs/benchmarks.md, note 36).
usable() {
    "$1" -c 'import ensurepip, sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
elif [ "$(uname -s)" = Linux ] && [ -x /usr/bin/python3 ] && usable /usr/bin/python3; then
    python=/usr/bin/python3
else
    python=python3
fi
base_of() {
    "$1" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null || true
}
made_with=""
if [ -e "$venv" ]; then
    made_with="$(base_of "$venv/bin/python")"
    if [ -z "$made_with" ]; then
        echo "$venv is there but its python does not run (was its interpreter removed?):" \
             "remove it to remake it" >&2
        exit 1
    fi
elif ! usable "$python"; then
    echo "$python is not a Python 3.11 or newer that can make a virtual environment" \
         "(set PYTHON to one)" >&2
    exit 1
else
    echo "creating virtual environment in $venv ($(base_of "$python"))" >&2
    "$python" -m venv "$venv"
fi
# A .venv made earlier is used as it is (a test may be running from it), but one on
# another interpreter than the one chosen above is pointed out.
if [ -n "$made_with" ] && [ "$made_with" != "$(base_of "$python")" ]; then
    if usable "$python"; then
        echo "note: $venv runs on $made_with, not on $(base_of "$python")" \
             "(remove it to remake it)" >&2
    else
        echo "note: $python is not a usable Python 3.11 or newer; $venv is used as it is" >&2
    fi
fi
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "installing ehrnode and its dev tools into $venv (log: $venv/install.log)" >&2
    if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
           "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[dev]"; } \
           >"$venv/install.log" 2>&1; then
        tail -n 30 "$venv/install.log" >&2
        echo "installation failed; the full log is $venv/install.log" >&2
        exit 1
    fi
    touch "$stamp"
fi
# The transaction path compiled with mypyc, for the sources as they are now (about 25 s
# after an edit; nothing when up to date; a note and pure Python where it cannot build).
"$venv/bin/python" -c 'import sys; from ehrnode.compiled import main; sys.exit(main())'
export PATH="$venv/bin:$PATH"
cd "$root"
