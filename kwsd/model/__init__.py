"""Model acquisition: fetch the upstream files, parse the Kaldi nnet1 weights, export a streaming ONNX."""

EXAMPLE_ENV = "KWSD_MODEL_EXAMPLE"
"""The variable ``scripts/setup`` reads for the example recording when the model source lacks it."""


def example_hint(path: str) -> str:
    """What to do about a missing example recording, in the same words wherever it is found missing."""
    return (f"the export plays the model card's example recording {path} through the model to verify it; "
            f"give it with --example FILE (scripts/setup: {EXAMPLE_ENV}=/path/to/kws_xiaoyunxiaoyun.wav)")
