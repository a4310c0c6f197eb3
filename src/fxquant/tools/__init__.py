"""User-facing tools: explain / report, save / load, command line, demo."""
