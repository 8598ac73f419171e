"""``diffalign label``: a local page where people pick preferred images, writing datasets the trainer reads."""

from diffalign.label.server import LabelServer, serve
from diffalign.label.sources import D3poRoundSource, PairsSource, RankedSource, open_source
from diffalign.label.store import LabelLog

__all__ = ["D3poRoundSource", "LabelLog", "LabelServer", "PairsSource", "RankedSource", "open_source", "serve"]
