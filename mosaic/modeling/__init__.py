"""Model classes for checkpoints with per-layer widths (composite pruning).

``modeling_mosaic.py`` is self-contained and is copied into such checkpoints, so they load with
``trust_remote_code=True`` anywhere transformers is installed. Inside Mosaic the same classes are
registered with the transformers auto classes, so no remote code is needed.
"""

from __future__ import annotations

from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_mosaic.py")


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know the mosaic_* model types (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mosaic.modeling.modeling_mosaic import CLASSES

    for config_class, model_class, _ in CLASSES.values():
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered
            pass
