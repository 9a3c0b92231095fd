"""The Ray-level steps of the pipeline. Each stage reads a job config and a results root, streams
its inputs through Ray Data actor pools (or Ray Train), writes Parquet through ``storage`` and
commits a manifest last. The mathematics they call lives outside this package and has no Ray import.
"""
