"""Small runnable examples (not part of the installed package)."""
