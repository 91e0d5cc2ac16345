"""The pipeline's stages, in order: sample -> score -> train -> evaluate, then the report.

Each module is one stage, run by ``o1pruner.pipeline.Pipeline`` on its run directory.
"""
