"""The backbones of Table 4 by name: the one list of what `model.backbone` accepts. config.py derives the
setting's choices from it and nn/backbones.py builds each by its family; free of torch, because the
config loads in the light commands, which do not import it."""

# name: its family, a key of nn/backbones.py:FAMILIES (a ResNet's depth is its row of RESNETS there)
BACKBONES = {
    "resnet18": "resnet",
    "resnet50": "resnet",
    "resnet101": "resnet",
    "efficientnet_b4": "efficientnet",
    "vit_b_16": "vit",
}
