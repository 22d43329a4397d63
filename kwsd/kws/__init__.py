"""Keyword spotting: features, ONNX session, CTC keyword decoder, batched multi-stream detector."""
