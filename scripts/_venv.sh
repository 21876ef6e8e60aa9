# Sourced by scripts/demo and scripts/test: make .venv and install the project into it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
elif [ -n "${PYTHON:-}" ]; then
  # An existing .venv is used as it is: one made by another Python would test that one.
  version='import sys; print("%d.%d" % sys.version_info[:2])'
  wanted=$("$python" -c "$version")
  found=$(.venv/bin/python -c "$version")
  if [ "$wanted" != "$found" ]; then
    echo "PYTHON=$PYTHON is Python $wanted, but .venv has Python $found:" \
      "remove .venv, or run from another clone, to check with $wanted" >&2
    exit 1
  fi
fi
stamp=".venv/.otelprof-installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$1]"
  rm -f .venv/.otelprof-installed-*  # another extra may have changed the set
  touch "$stamp"
fi
