"""One map on the parent's side, split by concern (see job.py for the picture).

Only `MapJob` is used by the layers above (Pool.run_map builds it); the other
modules are the collaborators it is made of.
"""
from .job import MapJob

__all__ = ["MapJob"]
