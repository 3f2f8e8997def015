"""Which files are images: one suffix set for every loader (image folders, COCO folders, YOLO datasets)."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
"""Suffixes OpenCV's ``imread`` decodes that image datasets use, compared lower-case."""
