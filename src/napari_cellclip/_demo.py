"""The README demo: napari with the bundled LINCS plate, the Search widget docked, embeddings computed.

    python -m napari_cellclip._demo [--query TEXT] [--no-gallery] [--map] [--screenshot PATH]

1. Makes sure a checkpoint exists: ``./checkpoints/cellclip-lincs-sample`` (the output
   of ``python -m training fit`` with its defaults, trained on the bundled sample in
   well under a minute on a CPU) is reused when present, else trained now in a
   subprocess.  ``--checkpoint`` picks another one.
2. Opens napari with the sample plate (5 stain layers, a slider over the 12 fields),
   docks the Search widget and embeds the plate in the background.
3. With ``--query``, runs that text query, shows the hits side by side as a gallery
   next to the plate (unless ``--no-gallery``) and the best field; with ``--map``, docks
   the Perturbation map (in a tab) and computes a UMAP of the fields, hits ringed.
4. With ``--screenshot PATH``, saves a screenshot of the whole window and quits
   (for the docs; run under ``xvfb-run`` on a headless machine).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path("checkpoints") / "cellclip-lincs-sample"


def _is_checkpoint(path: Path) -> bool:
    from .checkpoints import resolve_checkpoint
    from .errors import CheckpointError

    try:
        resolve_checkpoint(path)
    except CheckpointError:
        return False
    return True


def ensure_checkpoint(path: Path = DEFAULT_CHECKPOINT) -> Path:
    """Reuse ``path`` if it holds a checkpoint; else train one there with ``python -m training fit``."""
    path = Path(path)
    if _is_checkpoint(path):
        print(f"[demo] reusing checkpoint {path}", file=sys.stderr)
        return path.resolve()
    print(f"[demo] no checkpoint in {path}: training one on the bundled sample "
          "(python -m training fit) ...", file=sys.stderr)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "training", "fit", "--output", str(path), "--no-progress"]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not _is_checkpoint(path):
        raise SystemExit(f"[demo] training failed (exit code {proc.returncode}); run {' '.join(cmd)} to see why")
    print(f"[demo] trained in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return path.resolve()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m napari_cellclip._demo", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="checkpoint folder (trained here with `python -m training fit` if missing)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--query", help="run this text query once the plate is embedded")
    p.add_argument("--top-k", type=int, default=20, help="results shown (and highlighted on the map)")
    p.add_argument("--no-gallery", action="store_true", help="do not show the hits as a gallery beside the plate")
    p.add_argument("--map", action="store_true", help="also dock the Perturbation map and compute a UMAP")
    p.add_argument("--map-level", default="fields", choices=["fields", "wells"])
    p.add_argument("--screenshot", type=Path, help="save a screenshot of the whole window here and quit")
    p.add_argument("--size", default="1600x1000", help="window size WxH (default 1600x1000)")
    return p


class _Demo:
    """Drives the widgets step by step from a QTimer (nothing blocks the event loop)."""

    def __init__(self, viewer, search, cmap, args):
        self.viewer, self.search, self.cmap, self.args = viewer, search, cmap, args
        self.step = "embed"
        self.jobs = []
        self.t0 = time.perf_counter()

    def tick(self) -> bool:
        """Advance; returns False when finished."""
        if any(j is not None and not j.done for j in self.jobs):
            return True
        if time.perf_counter() - self.t0 > 600:
            print("[demo] giving up after 10 minutes", file=sys.stderr)
            return False
        s = self.search
        if self.step == "embed":
            self.jobs = [s.embed_plate()]
            self.step = "query"
            return self.jobs[0] is not None
        if self.step == "query":
            if s.state.store is None:
                print("[demo] embedding failed: see the notification", file=sys.stderr)
                return False
            print(f"[demo] embedded {len(s.state.store)} fields", file=sys.stderr)
            self.jobs = [s.run_query(self.args.query)] if self.args.query else []
            self.step = "show"
            return True
        if self.step == "show":
            res = s.state.results
            if res is not None and len(res):
                top = res.head(5)[["rank", "score", "Metadata_Well", "Metadata_Site", "Metadata_pert_iname"]]
                print(top.to_string(index=False), file=sys.stderr)
                s.select_result(0)
            self.jobs = [s.gallery_job] if s.gallery_job is not None else []
            self.step = "map"
            return True
        if self.step == "map":
            self.step = "done"
            if self.cmap is not None:
                self.cmap.level_combo.setCurrentText(self.args.map_level)
                self.jobs = [self.cmap.compute("auto")]
            return True
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = ensure_checkpoint(args.checkpoint)

    import napari
    from qtpy.QtCore import QTimer

    from .sample import sample_plate_dir

    viewer = napari.Viewer(title="napari-cellclip demo")
    w, h = (int(v) for v in args.size.lower().split("x"))
    viewer.window._qt_window.resize(w, h)  # noqa: SLF001 - no public resize
    viewer.open(str(sample_plate_dir()), plugin="napari-cellclip")
    _, search = viewer.window.add_plugin_dock_widget("napari-cellclip", "Search")
    search.set_checkpoint(checkpoint)
    search.device_combo.setCurrentText(args.device)
    search.topk_spin.setValue(args.top_k)
    search.gallery_check.setChecked(not args.no_gallery)
    cmap = None
    if args.map:
        map_dock, cmap = viewer.window.add_plugin_dock_widget("napari-cellclip", "Perturbation map", tabify=True)
        map_dock.raise_()  # the map's tab in front
    if args.query:
        search.query_edit.setText(args.query)

    demo = _Demo(viewer, search, cmap, args)
    timer = QTimer()
    timer.setInterval(200)

    def on_tick():
        if demo.tick():
            return
        timer.stop()
        if args.screenshot is not None:
            QTimer.singleShot(1500, shoot)

    def shoot():
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.screenshot), canvas_only=False, flash=False)
        print(f"[demo] screenshot saved to {args.screenshot}", file=sys.stderr)
        viewer.close()

    timer.timeout.connect(on_tick)
    timer.start()
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
