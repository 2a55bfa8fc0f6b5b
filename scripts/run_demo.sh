#!/usr/bin/env bash
# Set up the environment and run the main job on its embedded default:
# float training of a small DeiT on scikit-learn's 8x8 digits, then, for each
# of 3 seeds, QAT with uniform W4A4, W3A3 and W2A2 and Q-ViT mixed head-wise
# bits at the 3-bit and 2-bit BitOPs budgets; a table of mean +- std and the
# paired verdicts of Q-ViT mixed vs uniform at the same budget.
# Extra arguments go to `qvit train` (e.g. --seeds 0 for one seed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" demo
cd "$root"
qvit train "$@"
