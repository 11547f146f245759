#!/usr/bin/env bash
# The README demo: train or reuse the sample checkpoint, then open napari with the bundled
# LINCS plate embedded and the Search widget docked.  Without a display (a headless
# server) it runs on a virtual X server and saves a screenshot instead of a window.
set -euo pipefail
PY=${1:-.venv/bin/python}
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "$(uname -s)" = "Darwin" ]; then
  exec "$PY" -m napari_cellclip._demo
fi
echo "no display found: running the demo on a virtual X server and saving demo.png"
exec xvfb-run -a -s "-screen 0 1600x1000x24" "$PY" -m napari_cellclip._demo \
  --query "A549 cells treated with compound: lonafarnib" --screenshot demo.png
