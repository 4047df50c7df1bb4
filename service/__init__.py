"""Cutout: background removal and image effects over HTTP."""
