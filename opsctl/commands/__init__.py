"""One module per command group: parse the options, call the engine, components or
targets, render the result through opsctl.ui (never print), exit with the codes in
opsctl.errors. Heavy imports stay inside the command functions, so `opsctl --help` is fast."""
