"""``from deltaspec.testing import assert_spectra_within``: the documented import for users' tests.

The helper lives in :mod:`deltaspec.gate.testing`; this module only re-exports it.
"""

from deltaspec.gate.testing import assert_spectra_within, rules_from_keywords

__all__ = ["assert_spectra_within", "rules_from_keywords"]
