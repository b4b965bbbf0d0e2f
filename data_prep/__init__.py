"""Raw data to prepared datasets: the synthetic world generator and description-driven preparation."""
