"""Training: trainer, losses, optimizer, LR schedule, checkpoints, metrics, expert-bias controller.

``python -m longcat.train`` runs the command line (``__main__.py``, an entry point); importing this
package does not import it.
"""
