"""Docking: the CellCLIP widgets share one tabbed dock area instead of stacking.

Stacked one above the other, the Search widget and the Perturbation map need more
height than a laptop screen has; in tabs each gets the full height.
"""

from __future__ import annotations

from qtpy.QtWidgets import QWidget

__all__ = ["tabify_with_siblings", "tabify_when_docked", "MARKER"]

#: class attribute marking a CellCLIP dock widget
MARKER = "_cellclip_dock"


def tabify_with_siblings(widget: QWidget) -> None:
    """Put ``widget``'s dock in a tab with the other CellCLIP docks of its side of the window
    (stacked, the two would not fit a laptop screen).  Call once it is docked."""
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    dock = widget.parentWidget()
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    main = dock.parentWidget() if dock is not None else None
    if not isinstance(main, QMainWindow):
        return
    area = main.dockWidgetArea(dock)
    for other in main.findChildren(QDockWidget):
        if other is dock or main.dockWidgetArea(other) != area or other.isFloating():
            continue
        inner = other.widget()
        found = [inner] + (inner.findChildren(QWidget) if inner is not None else [])
        if any(getattr(w, MARKER, False) for w in found):
            if dock not in main.tabifiedDockWidgets(other):
                main.tabifyDockWidget(other, dock)
                dock.raise_()
            return


def tabify_when_docked(widget: QWidget) -> None:
    """Tabify ``widget`` once control returns to the event loop (napari docks it after creating it)."""
    from qtpy.QtCore import QTimer

    def later():
        try:
            tabify_with_siblings(widget)
        except RuntimeError:  # the widget was deleted meanwhile
            pass

    QTimer.singleShot(0, later)
