"""Images in: decoding any file people have, preprocessing, dataset sources, augmentation."""
