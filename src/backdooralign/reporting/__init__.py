"""Reports: a pure function of the run directory (numbers, verdicts, plots, Markdown and HTML)."""
