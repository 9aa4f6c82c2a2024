"""The CI regression gate: snapshot a trusted update, check new runs against it.

- :mod:`~deltaspec.gate.snapshot` — the versioned baseline file (metrics + top-K vectors);
- :mod:`~deltaspec.gate.rules` — tolerances, bounds and the rules file (TOML or JSON);
- :mod:`~deltaspec.gate.check` — the comparison of a run with a baseline;
- :mod:`~deltaspec.gate.testing` — ``assert_spectra_within`` for users' own test suites.
"""
