#!/usr/bin/env bash
# Set up the environment and run the main job on its embedded default:
# float training of a small DeiT on scikit-learn's 8x8 digits, then QAT with
# uniform W4A4, uniform W3A3 and Q-ViT mixed head-wise bits at the 3-bit budget.
# Extra arguments go to `qvit train`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" demo
cd "$root"
qvit train "$@"
