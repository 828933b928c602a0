"""Training: the loop, the losses, checkpoints, precision and the training data with its augmentations."""
