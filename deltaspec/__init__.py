"""deltaspec: exact spectral analysis of fine-tuning weight updates (ΔW).

>>> import deltaspec
>>> sorted(deltaspec.__all__)[:3]
['Delta', 'DeltaspecError', 'Spectrum']
"""

from deltaspec.analyze import analyze, compare, spectra
from deltaspec.delta import Delta
from deltaspec.engine.spectrum import Spectrum, spectrum
from deltaspec.errors import DeltaspecError
from deltaspec.loaders import load

__all__ = [
    "Delta",
    "DeltaspecError",
    "Spectrum",
    "analyze",
    "compare",
    "load",
    "spectra",
    "spectrum",
]
__version__ = "0.1.0"
