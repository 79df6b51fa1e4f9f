"""Where replicas live: the ``Platform`` interface (``base``) and its local-process backend.

Import ``strata.platform.local.LocalPlatform`` for the backend; this package exports only
the interface types, so importing it stays cheap and free of cycles.
"""

from strata.platform.base import Endpoint, Platform, Replica, ReplicaPhase

__all__ = ["Endpoint", "Platform", "Replica", "ReplicaPhase"]
