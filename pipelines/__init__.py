"""Dask pipelines: ingest (Major TOM shards -> latent store) and export (latents ->
GeoTIFFs). They join the package as the ingestion and region-workflow issues land."""
