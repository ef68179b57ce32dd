"""The rewriter deployment: a better suffix for each passage, batched across callers."""

from __future__ import annotations

from ray import serve

from sip.records import Passage
from sip.serve.backends import make_rewriter_backend
from sip.serve.judge import deployment_options, teacher_settings
from sip.config import DataConfig, DeploymentConfig

REWRITER_APP = "sip-rewriter"


@serve.deployment
class Rewriter:
    def __init__(self, cfg: DeploymentConfig, data_cfg: DataConfig):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.backend = make_rewriter_backend(cfg.backend, data_cfg, cfg.llm)
        self.rewrite.set_max_batch_size(cfg.max_batch_size)
        self.rewrite.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rewrite(self, passages: list[Passage]) -> list[str]:
        return await self.backend.rewrite(passages)

    def settings(self) -> dict:
        """What this replica rewrites with: a run that attaches to it checks these against its own."""
        return teacher_settings(self.cfg, self.data_cfg)


def rewriter_app(cfg: DeploymentConfig, data_cfg: DataConfig):
    return deployment_options(Rewriter, cfg).bind(cfg, data_cfg)
