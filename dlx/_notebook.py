"""How a view goes into a notebook: whether a kernel runs, and the widget shown beside a static PNG.

A view displayed in a kernel leaves two outputs: the widget, and a static PNG of it. While the
widget is alive, a style inside it (:data:`STATIC_HIDER`) hides the PNG that follows it (JupyterLab
and Notebook 7 markup); a notebook saved and reopened, ``jupyter nbconvert --to html``, GitHub or
nbviewer cannot show the widget, has no such style, and shows the PNG.
"""

from __future__ import annotations

__all__ = ["in_kernel", "STATIC_HIDER", "display_static"]

STATIC_HIDER = ("<style>.jp-OutputArea-child:has(.dlx-view) + .jp-OutputArea-child:has(.jp-RenderedImage)"
                "{display:none}</style>")


def in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (a front end may show widgets)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def display_static(widget, png: bytes, text: str, display_id=None):
    """Display ``widget`` and, as the next output, its static picture ``png`` (``text``: its
    plain-text form); ``display_id`` lets the picture be updated later (a live run when it ends)."""
    from IPython.display import display

    display(widget)
    return display({"image/png": png, "text/plain": text}, raw=True, display_id=display_id)
