"""The evaluation layer: tasks, metrics, reports and plots (evaluation).

May import: every layer below it, including the composer (localpers.serve.compose) so that an evaluation answers
exactly as `localpers serve` would; never localpers.cli.
"""
