"""Serving: a FastAPI service (run by uvicorn) for a trained model of either family, with dynamic
batching, a faiss index for large catalogs and new items without retraining. ``lmrec serve`` starts it.

Its web stack is the optional ``serve`` extra (``pip install 'lmrec[serve]'``): importing this package
without it is one message naming the extra, not an ImportError from deep inside the app."""

from importlib.util import find_spec

from lmrec.errors import LmrecError

SERVE_EXTRA = ("fastapi", "uvicorn", "swagger_ui_bundle")


def require_serve_extra() -> None:
    missing = [m for m in SERVE_EXTRA if find_spec(m) is None]
    if missing:
        raise LmrecError(f"lmrec serve needs {', '.join(missing)}, optional dependencies of lmrec: "
                         "pip install 'lmrec[serve]'")


require_serve_extra()
