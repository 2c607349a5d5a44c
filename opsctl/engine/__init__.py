"""Steps, ordering, the state file, dry-run plans and resume. Runs components through their
Component interface; imports no command and no target implementation."""
