"""A model split into layer-range stage services (module-level scaling).

``head`` runs the scheduler, the embedding and the first layers and serves the OpenAI
API; ``worker`` runs any later layer range (the last one samples); hidden states travel
between them as raw tensor frames (``transport``, ``protocol``). Each downstream stage is
its own replica set (``replicas``), split by measured cost (``plan``), run as platform
tiers (``tiers``) and scaled on its own busy ratio (``scaling``).
"""
