"""Errors that library code raises; only ``cli.py`` turns them into flags, one-line messages and exit
codes."""


class OptionError(ValueError):
    """Bad input or an impossible request. ``option`` names the ``Options`` field at fault (the CLI
    shows it as its flag, ``--option``); ``message`` says what is wrong and how to fix it."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message

    def __reduce__(self):  # pickled as its arguments: it crosses ranks (``dist.run_on``)
        return type(self), (self.option, self.message)


class EvaluationError(RuntimeError):
    """Evaluation failed (``status`` "failed") or was interrupted after the pruned model and results.json
    were written to ``saved``; ``cause`` is what stopped it."""

    def __init__(self, status: str, saved: list[str], cause: BaseException):
        super().__init__(f"evaluation {status} ({type(cause).__name__}: {cause}); "
                         f"saved: {', '.join(saved) or 'nothing'}")
        self.status, self.saved, self.cause = status, saved, cause

    def __reduce__(self):
        return type(self), (self.status, self.saved, self.cause)
