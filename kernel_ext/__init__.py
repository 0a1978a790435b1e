"""IPython extension for duet: ``%load_ext kernel_ext`` (or ``%load_ext duet``).

Adds the ``%duet`` magic (``kernel_ext.magics``), the owner's live approval panel
(``kernel_ext.widgets``) and HTML displays for requests and the researcher's session
(``kernel_ext.display``). It only adapts duet to IPython; everything it does is also
reachable from plain Python.
"""

from __future__ import annotations

from typing import Any

from .display import register_formatters
from .magics import DEFAULT_NAME, DuetMagics
from .widgets import ApprovalPanel, approval_panel

__all__ = ["DEFAULT_NAME", "ApprovalPanel", "DuetMagics", "approval_panel",
           "load_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(DuetMagics)
    register_formatters(ipython)
