"""The report of a run: per-layer plots, Markdown and a self-contained HTML page.

- document: blocks (heading, paragraph, table, figure, code) rendered to Markdown and HTML
- plots:    per-block line and bar plots (matplotlib Agg) as PNG bytes
- build:    ``write_report(run_dir)``: read a run's artefacts, lay them out, write the report
"""
