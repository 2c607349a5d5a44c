"""AI screening of orders: features, the VAE model, its jobs and the streaming scorer."""
