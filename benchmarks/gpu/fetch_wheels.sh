#!/usr/bin/env bash
# The Python packages ember needs that the device machine's image lacks (gguf, llguidance,
# platformdirs; see /work/.library/device/KINDS.md for what it has), as wheels for its Python 3.12
# in .whl/ (ignored by git), to be carried with the run: run(..., carry=[".whl"]).
# Run once here, from the repository root. Versions: what this checkout's environment resolved.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pkgs=()
for name in gguf llguidance platformdirs; do
  pkgs+=("$name==$(python3 -c "from importlib.metadata import version; print(version('$name'))")")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}"
ls -l .whl
