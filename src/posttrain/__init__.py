"""posttrain: agent-orchestrated post-training of language models.

The library (data, models, align, rollout, rewards, compress, evaluate, select) is usable on its own; the agents
(agents/) drive it over a durable message bus (bus/), and the live views (live/) read the run's event log.
"""

__version__ = "0.1.0"
