"""sip: Self-Improving Pretraining on Ray.

The code lives in the repository's top-level folders, installed as subpackages of `sip`:
`sip.train` (config, data, losses, the loop, CLI), `sip.actors` (generators, learner),
`sip.serve` (judge and rewriter deployments and their backends).
"""

__version__ = "0.1.0"
