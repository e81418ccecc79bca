"""Other formats: exported MindIR/ONNX models and the ONNX-friendly layer forms."""
