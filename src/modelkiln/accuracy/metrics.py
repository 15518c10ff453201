"""Pure numeric comparisons of two tensors, kept importable from ``accuracy`` for its callers.

They live in ``modelkiln.numerics`` (a leaf module that export and graph use too, which must not
import accuracy).
"""

from __future__ import annotations

from modelkiln.numerics import cosine, max_abs_error, max_rel_error, snr_db

__all__ = ["cosine", "max_abs_error", "max_rel_error", "snr_db"]
