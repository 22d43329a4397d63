"""Model acquisition: fetch the upstream files, parse the Kaldi nnet1 weights, export a streaming ONNX."""
