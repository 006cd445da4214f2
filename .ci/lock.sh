#!/usr/bin/env bash
# Refresh the lock, constraints.txt: the exact version of every package .ci/setup.sh installs.
# Usage: bash .ci/lock.sh   (from the repo root; ~4 minutes)
# It installs what setup.sh installs into a throwaway venv with only torch held (at the version the
# lock pins now, or TORCH=X.Y.Z), everything else at its newest, and writes what that venv holds.
# Then rebuild .venv from the new lock (rm -r .venv && bash .ci/setup.sh) and run the tests before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
torch=${TORCH:-$(sed -n 's/^torch==//p' constraints.txt)}
if [ -z "$torch" ]; then
  echo "error: constraints.txt pins no torch version; name one: TORCH=2.13.0 bash .ci/lock.sh" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "torch==$torch" > "$tmp/torch.txt"
SMFT_VENV="$tmp/venv" SMFT_CONSTRAINTS="$tmp/torch.txt" bash .ci/setup.sh
python=$("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version(), "on", platform.system(), platform.machine())')
{
  cat <<HEADER
# The lock: every package .ci/setup.sh installs, transitive ones included, at the exact version CI
# tests. Made $(date -u +%F) by \`${TORCH:+TORCH=$TORCH }bash .ci/lock.sh\` (Python $python).
# Refresh: \`bash .ci/lock.sh\`, then rebuild .venv from it and run the tests; tests/test_lock.py fails
# when the running venv differs from this file.
# Pass \`-c constraints.txt\` to every pip call (setup.sh does): nothing then resolves past it or pulls
# torchvision (never install it). torch is pinned by version only, so the build is the machine's:
# setup.sh gets the CPU build (a wheel of this version is on local disk); on a GPU machine, PyPI's
# Linux wheel is the CUDA build.
HEADER
  # pip itself is the venv's own (python -m venv), not something setup.sh installs; the editable
  # smft_dist is this tree. torch's local label (+cpu) is dropped: the build is chosen per machine.
  "$tmp/venv/bin/pip" freeze --all --exclude-editable --exclude pip --disable-pip-version-check |
    sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt: $(grep -c '==' constraints.txt) packages"
