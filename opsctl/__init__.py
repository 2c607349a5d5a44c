"""opsctl: stands up and operates the AI-assisted order-management platform."""

__version__ = "0.1.0"
