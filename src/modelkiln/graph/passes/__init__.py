"""One pass per file; the default pipeline is the explicit tuple in ``modelkiln.graph.pipeline``."""
