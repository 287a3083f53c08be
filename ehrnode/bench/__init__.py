"""``scripts/bench``: measurements of a local 4-validator network beside this machine's own
ceiling. Run ``python -m ehrnode.bench --help``."""
