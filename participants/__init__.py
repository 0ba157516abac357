"""walsaga's consuming side: the participant runtime, the saga orchestrator, and
the example services built on them."""
