"""diffalign: preference alignment for diffusion models and text language models.

Every method is a likelihood proxy (a per-sample score s(x)) plus a pure core loss from
:mod:`diffalign.losses`; see ``DESIGN.md`` in the project's shared notes.
"""

from diffalign import losses

__version__ = "0.1.0"

__all__ = ["losses", "__version__"]
