"""The bundled order services and their shared helpers: the order API (order_creator), the
stock service, the consumers, the CDC bridge and the AI screening (screening/). Each runs
as `python -m order_services.<module>` with its settings from the environment (settings.py)
and its credentials from Vault (secrets.py). Never imports opsctl."""
