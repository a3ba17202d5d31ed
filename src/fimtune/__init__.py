"""fimtune: turn your own code into your own fill-in-the-middle code copilot."""

__version__ = "0.1.0"
