"""Vehicle actions out: a durable, acknowledged queue of what the car should do (docs/actions.md)."""
from service.actions.model import KINDS, PRIORITIES, ActionRequestError
from service.actions.queue import ActionConflict, ActionNotFound, ActionQueue

__all__ = ["ActionQueue", "ActionRequestError", "ActionNotFound", "ActionConflict", "KINDS", "PRIORITIES"]
