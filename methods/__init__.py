"""Merge-method plugins: pure tensor functions plus thin ``MergeMethod`` wrappers."""
