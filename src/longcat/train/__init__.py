"""Training: trainer, losses, optimizer, LR schedule, checkpoints, metrics, expert-bias controller."""


def main() -> int:
    """Console-script entry (``longcat-train``); the Hydra logic lives in ``longcat.cli``."""
    from longcat.cli import main as cli_main

    return cli_main()
