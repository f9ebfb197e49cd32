"""Export for serving: SavedModel, frozen graph, ONNX, TensorRT, TF-TRT, Triton."""

from tfopt.export._api import FORMATS, PRECISIONS, ExportResult, export

__all__ = ["FORMATS", "PRECISIONS", "ExportResult", "export"]
