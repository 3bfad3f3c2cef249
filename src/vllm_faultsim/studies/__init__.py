"""Embedded what-if studies (YAML): default.yaml is the README's main job."""
