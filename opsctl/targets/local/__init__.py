"""The local target: supervised processes of the real servers and services on this machine
(target.py), supervisord driven over its socket (supervisor.py), one process's record and
logs (process.py). Only the run context's `runtime` and the tests reach into it."""
