"""Steps, ordering, the state file, dry-run plans and resume."""
