"""mergelab orchestration: the only package that knows every part."""
