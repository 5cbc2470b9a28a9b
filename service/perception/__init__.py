"""Perception: the cheap, always-on stages of the cascade (motion, faces, objects, text)."""
