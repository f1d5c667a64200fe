"""Layers: normalisation/activation factories (and their fused CUDA LayerNorm), conv-norm-act, InterpConv upsampling,
SEW-MHSA, the i2RMB, and time/class conditioning."""

from .conditioning import AdaLNModulation
from .conv_norm_act import ConvNormAct
from .i2rmb import I2RMB
from .interp_conv import InterpConv
from .norms import LayerNorm2d, make_act, make_norm, norm_act
from .sew_mhsa import SEWMHSA

__all__ = ["AdaLNModulation", "ConvNormAct", "I2RMB", "InterpConv", "LayerNorm2d", "SEWMHSA", "make_act", "make_norm", "norm_act"]
