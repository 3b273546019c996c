"""lolachat: a local chat runtime whose conversations have bounded memory (LoLA attention).

    import lolachat
    eng = lolachat.load("smollm2-135m", device="cpu", window=64, sparse=256)
    sess = eng.session()
    for piece in sess.chat("Hello!", max_new_tokens=64, temperature=0.0):
        print(piece, end="")
"""

__version__ = "0.1.0"
__all__ = ["load", "LolachatError", "__version__"]

from lolachat.errors import LolachatError


def load(model: str | None = None, **kwargs):
    """Load a model by catalog alias, Hub repo id or local path; see `lolachat.engine.load`."""
    from lolachat.engine import load as _load

    return _load(model, **kwargs)
