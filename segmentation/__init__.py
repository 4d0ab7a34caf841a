"""segmentation: a readable, configurable 2D/3D U-Net pipeline for medical image segmentation."""

from segmentation.nets.unet import UNet

__all__ = ["UNet"]
__version__ = "0.1.0"
