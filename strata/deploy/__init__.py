"""Deployment artefacts derived from the cluster file (Kubernetes manifests)."""
