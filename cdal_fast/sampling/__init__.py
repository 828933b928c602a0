"""From pixels to probabilities: preprocessing, the fixed-step sampler and its noise, test-time
augmentation, decoding to masks, and running a sampler over patches, images and volumes."""
