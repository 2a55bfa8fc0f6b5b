#!/usr/bin/env bash
# Set up the environment and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" test
cd "$root"
python -m pytest -q -ra "$@"
