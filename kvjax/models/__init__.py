"""Example models that decode through kvjax (not part of the cache core)."""
