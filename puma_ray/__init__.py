"""puma-ray: migrate per-user soft prompts between LLMs (PUMA) on a Ray cluster."""

__version__ = "0.1.0"
