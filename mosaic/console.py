"""Console set-up shared by the command-line entry points: quiet third-party logs, keep our own."""

from __future__ import annotations

import logging
import os


def quiet_progress() -> None:
    """No progress bars in this process (the ranks of a launched run other than 0)."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__

    def quiet(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "disable": True})

    tqdm.std.tqdm.__init__ = quiet


def quiet_libraries(rank: int = 0) -> None:
    """Third-party logs at ERROR; ours at INFO on rank 0 and ERROR on the other ranks of a launched run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.ERROR if rank else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "datasets", "accelerate", "lm_eval", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
