"""The bundled order services and their shared helpers."""
