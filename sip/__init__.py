"""sip: Self-Improving Pretraining on Ray.

This folder is the core every role imports: the config, the records a sample travels as and the
judge's wire types, the objectives, weights on the wire, the world, checkpoint files, cluster errors
and every vLLM call. It imports nothing of the roles. The roles live in the repository's top-level
folders, installed as subpackages: `sip.train` (the driver: CLI, loop, data, evaluation),
`sip.actors` (rollout workers, learner group, weight transports) and `sip.serve` (judge and rewriter
deployments, backends, engines, prompts). pyproject.toml's import-linter contracts keep it so.
"""

__version__ = "0.1.0"
