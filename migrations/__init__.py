"""Makes this folder of plain-SQL migrations the package `registry.migrations` (pyproject.toml)."""
