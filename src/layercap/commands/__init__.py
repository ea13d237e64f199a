"""CLI sub-commands. Each module: ``register(subparsers) -> parser`` and ``main(args) -> int``."""
