# Sourced by scripts/*: creates .venv on first use and installs the project into it.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
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
export PATH="$venv/bin:$PATH"
cd "$root"
