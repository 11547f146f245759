"""User-facing messages: thin wrappers so tests can capture them (monkeypatch these)."""

from __future__ import annotations

__all__ = ["error", "warning", "info"]


def error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)
