"""image-segmentation: not implemented yet (placeholder so the task registry can list it)."""
