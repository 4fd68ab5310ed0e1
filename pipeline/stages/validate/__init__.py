"""The validate stage (stage.py): perplexity and greedy agreement against the baseline, the export
targets through their own engines (targets.py), chat checks (chat.py), report.md and plots (report.py)."""

from pipeline.stages.validate import stage  # noqa: F401  (registers the stage)
