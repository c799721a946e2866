"""fswatchaudit: who did what to which watched path."""
__version__ = "0.1.0"
