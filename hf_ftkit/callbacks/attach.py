"""``add_callbacks``: hand hf-ftkit's callbacks to a Trainer through its public callback handler.

Order matters: a callback that adds keys to the Trainer's logs (``memory/*``) or logs its own measurements
(``forgetting/*``) must run before the ``report_to`` integrations (TensorBoard, W&B) see the logs. Trainer
puts ``callbacks=[...]`` after those integrations and hands no callback its handler; ``add_callbacks`` puts
hf-ftkit's callbacks first and gives each the handler. Callbacks passed as ``callbacks=[...]`` still work:
they find the handler from the event that calls them (a fallback kept for that usual spelling).
"""

from __future__ import annotations

from typing import Any


def add_callbacks(trainer: Any, *callbacks: Any) -> Any:
    """Add ``callbacks`` to ``trainer`` ahead of its reporting integrations, in the order given.

    Returns the trainer, so the call can wrap its construction.

    Example:
        >>> trainer = hf_ftkit.add_callbacks(Trainer(model, args, train_dataset=ds),
        ...                                  hf_ftkit.MemoryBudgetCallback(budget="24GiB"),
        ...                                  hf_ftkit.ForgettingCallback(hf_ftkit.stdlib_documents()))
    """
    handler = trainer.callback_handler
    for position, callback in enumerate(callbacks):
        if callback in handler.callbacks:
            handler.callbacks.remove(callback)
        handler.callbacks.insert(position, callback)
        bind = getattr(callback, "bind_handler", None)
        if callable(bind):
            bind(handler)
    return trainer
