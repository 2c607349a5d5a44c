"""opsctl: stands up and operates the AI-assisted order-management platform.

The layers, top to bottom (each may import the ones below it, never one above):
    cli.py, commands/   parse the command line, call, render through ui.py
    engine/             runs steps in order: the state file, plans and resume
    targets/            where components run (local processes, kubernetes); they know a
                        component by its interface (components/base.py)
    components/         each component's desired state, health and users; a component
                        reaches its target only through the run context (ctx.runtime)
and beside them spec.py (platform.yaml), context.py (one run), registry.py (the steps),
net.py, host.py, files.py, errors.py. opsctl never imports the services' package
(order_services): it knows a service as a module or an image with an environment.
"""

__version__ = "0.1.0"
