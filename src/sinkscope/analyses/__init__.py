"""Analyses: functions of a `Trace` (or callers of `run_capture`) that return tidy DataFrames keyed by
`prompt_id, layer, head, position, token`. No printing, no plotting, no command-line code."""
