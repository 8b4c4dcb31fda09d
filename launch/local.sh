#!/usr/bin/env bash
# Set up (once) and run busgen-jax on this machine.
#   bash launch/local.sh demo --workdir /tmp/busgen_demo    # any busgen-jax subcommand
#   bash launch/local.sh test [pytest args]                 # the test suite
# Creates .venv beside the checkout with python3 (>= 3.11) and installs the package with its pinned stack, the
# dev tools and libtpu (the `tpu` extra: `busgen-jax aot` compiles for TPU topologies on any machine).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BUSGEN_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.busgen-installed"
if [[ ! -x "$venv/bin/python" ]]; then
  "$py" -c 'import sys; assert sys.version_info >= (3, 11), "busgen-jax needs python3 >= 3.11, found " + sys.version' 
  "$py" -m venv "$venv"
fi
# Reinstall when pyproject.toml changes (the stamp records its hash).
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "${root}[dev,tpu]"
  echo "$want" > "$stamp"
fi
# libtpu is installed but this machine has no TPU chips: keep JAX on the CPU instead of probing for a TPU.
if [[ -z "${JAX_PLATFORMS:-}" ]] && ! compgen -G "/dev/accel*" > /dev/null && ! compgen -G "/dev/vfio/[0-9]*" > /dev/null; then
  export JAX_PLATFORMS=cpu
fi
cmd="${1:-}"; shift || true
case "$cmd" in
  test) cd "$root" && exec "$venv/bin/python" -m pytest "$@" ;;
  "") echo "usage: bash launch/local.sh {test|<busgen-jax subcommand>} [args]" >&2; exit 2 ;;
  *) exec "$venv/bin/busgen-jax" "$cmd" "$@" ;;
esac
