"""The engine process's entry point, importable without torch (the worker names it as the
process's target; only the process itself imports ``child``)."""

from __future__ import annotations

from typing import Any


def main(*args: Any) -> None:
    from .child import main as serve

    serve(*args)
