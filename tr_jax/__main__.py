"""``python -m tr_jax``: the CLI (no arguments: the quickstart study)."""
from tr_jax.cli import main

if __name__ == "__main__":
    main()
