"""X-Mark core: saliency, Laplacian pyramid, owner kit, ownership statistic."""
