"""Backbones: any timm model by name, plus ``cnn``, a compact baseline like the notebooks'.

The label asks "is there tumour in the centre 32×32 px?", so position matters.
timm models pool globally and learn position from padding and the crop; the
``cnn`` baseline keeps it explicitly with a flattened head over the final
feature map (like the notebooks' Keras Flatten → Dense heads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hcd.errors import HcdError

CUSTOM = {"cnn"}


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU ×2, max-pool), then a spatial head: ~0.37 M parameters."""

    def __init__(self, in_size: int = 96, widths: tuple[int, ...] = (16, 32, 64, 128), drop: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(3)  # keeps a 3x3 map: centre vs surround stays visible
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(drop), nn.Linear(c_in * 9, 64), nn.ReLU(inplace=True), nn.Dropout(drop), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1)
        return self.head(self.pool(self.features(x)))

    def get_classifier(self) -> nn.Module:
        return self.head


def known(name: str) -> bool:
    if name in CUSTOM:
        return True
    import timm  # with torchvision, 2 of a stage's 5-7 s of imports: only for timm backbones

    return timm.is_model(name)


def build_model(name: str, pretrained: bool | str = False) -> nn.Module:
    """A binary classifier (one logit). ``pretrained``: True = timm's hub weights, a path = local weights."""
    if name == "cnn":
        model: nn.Module = SmallCNN()
        if pretrained and not isinstance(pretrained, str):
            raise HcdError("train.pretrained: the custom 'cnn' has no pretrained weights (use a local file or false)")
    else:
        import timm  # only for timm backbones (see known)

        if not timm.is_model(name):
            raise HcdError(f"backbones: unknown backbone {name!r} (any timm model name, or 'cnn')")
        hub = pretrained is True
        try:
            model = timm.create_model(name, pretrained=hub, num_classes=1)
        except Exception as exc:  # hub download failures: offline machine, no weights for this name
            raise HcdError(f"train.pretrained: could not get timm's pretrained weights for {name!r} ({type(exc).__name__}); set pretrained: false or a local weights file") from None
    if isinstance(pretrained, str):
        load_weights(model, Path(pretrained), name)
    return model


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Local pretrained weights (safetensors, or a tensors-only torch file); the classifier is left new."""
    if not path.is_file():
        raise HcdError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    except Exception as exc:
        raise HcdError(f"{path}: not a loadable weights file ({type(exc).__name__}: {str(exc)[:80]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise HcdError(f"{path}: holds {type(state).__name__ if not isinstance(state, dict) else 'a mapping with other values'}, not weights (a mapping of parameter names to tensors)")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise HcdError(f"{path}: only {len(usable)} of {len(own)} tensors match {name!r}; wrong weights for this backbone?")
    model.load_state_dict(usable, strict=False)


def classifier_params(model: nn.Module) -> list[nn.Parameter]:
    """The head's parameters (what trains while the backbone is frozen)."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    return list(head.parameters()) if isinstance(head, nn.Module) else []
