"""Networks: ``resnet_lstm`` (slice classifier, Grad-CAM teacher) and ``unet`` (segmenter)."""
