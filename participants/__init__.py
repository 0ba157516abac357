"""walsaga's consuming side: the participant runtime, the saga orchestrator, and
the example services built on them. Uses the :mod:`walsaga` kernel; never
imports :mod:`relay`."""
