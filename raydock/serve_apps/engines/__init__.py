"""Inference engines. Each turns (prompt ids, SamplingParams) into a stream of StepEvents."""
