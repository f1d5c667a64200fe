"""emov2-gen's diffusers pipelines (installed as `emov2_gen.pipelines`)."""

from .pipeline_emov2_image import EMOv2ImagePipeline
from .pipeline_emov2_segmentation import EMOv2SegmentationPipeline

__all__ = ["EMOv2ImagePipeline", "EMOv2SegmentationPipeline"]
