"""Studies: one command each, running every arm of a comparison and writing a report (docs/results.md)."""
