"""User-facing errors: each message says what went wrong and what to do."""
from __future__ import annotations


class ExplorerError(Exception):
    """Base class for errors shown to users as one line (CLI) or a visible message (app)."""


class ExplorerWarning(UserWarning):
    """Warnings raised by the project itself (the test suite turns them into errors)."""


class EmptyPromptError(ExplorerError):
    def __init__(self) -> None:
        super().__init__("the prompt is empty: type some text to analyse")


class PromptTooLongError(ExplorerError):
    def __init__(self, n_tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt is {n_tokens} tokens but the model's context is {limit} tokens: shorten it"
        )


class ModelNotFoundError(ExplorerError):
    pass


class UnsupportedModelError(ExplorerError):
    pass


class TokenError(ExplorerError):
    pass


class SetupError(ExplorerError):
    pass
