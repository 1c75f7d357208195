"""The plugin reconcile: plan a diff, install what is missing, record every step."""
