"""The diffusion-transformer package (torch side): network, noise schedule, training,
sampling, latent codecs, weight conversion, metrics. It knows modalities and latent
tensors, never geography."""
