"""Acting on updates: writers of PEFT-loadable adapters and verdicts (``verify-merge``:
:mod:`deltaspec.act.verify`)."""
