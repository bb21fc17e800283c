"""Reading a training checkpoint (`--weights`): any file that is not one is a one-line ModelError naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from quant.errors import ModelError

M = TypeVar("M", bound=nn.Module)
BRIEF_CHARS = 240  # torch's messages list every tensor name; the head says enough


def read_checkpoint(path: Path, model: str, producer: str) -> dict[str, Any]:
    """The dict `producer` saved at `path` (state_dict + config + extras) for a `model` (e.g. "DPCRN")."""
    expected = f"expected a .pt file written by {producer}"
    if path.is_dir():
        raise ModelError(f"{path}: a folder, not a {model} checkpoint; {expected}")
    if not path.is_file():
        raise ModelError(f"{path}: no such {model} checkpoint; {expected}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types (UnpicklingError, RuntimeError, KeyError...) for other files
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({brief(error)}); {expected}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelError(f"{path}: not a {model} checkpoint: expected a dict with 'state_dict' and 'config' "
                         f"({producer} format)")
    return checkpoint


def build_model(path: Path | str, model: str, build: Callable[[], M]) -> M:
    """`build()` makes the module from the checkpoint's config; a config it cannot use is a ModelError naming `path`."""
    try:
        return build()
    except ModelError as error:  # the config class's own message, which does not know the file
        raise ModelError(f"{path}: {error}") from error
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a config entry of the wrong type or shape
        raise ModelError(f"{path}: the {model} config in this checkpoint is unusable ({brief(error)})") from error


def load_state(module: nn.Module, state_dict: Any, path: Path | str, model: str) -> None:
    """Load `state_dict` into `module`; missing, unexpected or mis-shaped tensors are one ModelError naming `path`."""
    fit = f"{path}: weights do not fit the {model} of its config"
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except (RuntimeError, TypeError, AttributeError) as error:  # shape mismatches; a state_dict that is no mapping
        raise ModelError(f"{fit}: {brief(error)}") from error
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise ModelError(f"{fit}: {len(missing)} tensors missing {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}")


def brief(error: BaseException) -> str:
    text = f"{type(error).__name__}: " + " ".join(str(error).split())
    return text if len(text) <= BRIEF_CHARS else text[: BRIEF_CHARS - 3] + "..."
