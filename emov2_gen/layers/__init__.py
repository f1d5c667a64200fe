"""Layers: normalisation/activation factories, conv-norm-act, SEW-MHSA, the i2RMB, and time/class conditioning."""

from .conditioning import AdaLNModulation
from .conv_norm_act import ConvNormAct
from .i2rmb import I2RMB
from .norms import LayerNorm2d, make_act, make_norm
from .sew_mhsa import SEWMHSA

__all__ = ["AdaLNModulation", "ConvNormAct", "I2RMB", "LayerNorm2d", "SEWMHSA", "make_act", "make_norm"]
