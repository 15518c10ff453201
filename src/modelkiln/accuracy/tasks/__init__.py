"""Task metrics: how a model is scored on what it is for (ImageNet top-k, COCO mAP)."""
