"""The rewriter deployment: a better suffix for each passage, batched across callers."""

from __future__ import annotations

from ray import serve

from sip.records import Passage
from sip.serve.backends import make_rewriter_backend
from sip.serve.replica import TeacherReplica, teacher_app
from sip.config import DataConfig, DeploymentConfig

REWRITER_APP = "sip-rewriter"


@serve.deployment
class Rewriter(TeacherReplica):
    def __init__(self, cfg: DeploymentConfig, data_cfg: DataConfig):
        super().__init__(cfg, data_cfg, make_rewriter_backend(cfg.backend, data_cfg, cfg.llm), self.rewrite)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rewrite(self, passages: list[Passage]) -> list[str]:
        return await self.backend.rewrite(passages)


def rewriter_app(cfg: DeploymentConfig, data_cfg: DataConfig):
    return teacher_app(Rewriter, cfg, data_cfg)
